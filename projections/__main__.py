"""`python -m projections`: the SQLite read models and the `proj.>` query endpoints, until SIGINT/SIGTERM
(or until the supervisor that started it is gone); `python -m projections replay` rebuilds the database
from the streams. `python -m projections retention` archives and purges old finished jobs; `python -m projections status` asks the running projections for their versions, positions, lags and
an upgrade's progress. `gpuctl up` runs the first as a child; `gpuctl projections [status]` and
`gpuctl replay` run them."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

from cyclopts import App, Parameter, validators
from rich.console import Console, Group
from rich.table import Table

from projections.feed import FOLDED_STREAMS
from projections.replay import rebuild
from projections.retention import Retained, archive_finished_jobs
from projections.service import serve
from sdk import subjects
from sdk.api.projections import GetProjectionsStatus, ProjectionsStatus
from sdk.connection import connect, nats_url_from_env, request
from sdk.ctl_history import CliError, platform_url
from sdk.errors import BadRequest, PlatformError
from sdk.history import parse_time, positions_at
from sdk.log import ensure_streams
from sdk.metrics import DEFAULT_METRICS_HOST, MetricsHostFlag, MetricsPortFlag
from sdk.process import NatsUrlFlag, run_until_signal, setup_logging

app = App(name="python -m projections", help="Run the projections (SQLite read models), or rebuild them.")


@app.default
def projections(
    *,
    nats_url: NatsUrlFlag = None,
    db: Path = Path(".data/projections.db"),
    metrics_port: MetricsPortFlag = None,
    metrics_host: MetricsHostFlag = DEFAULT_METRICS_HOST,
) -> None:
    """Run the projections: SQLite read models and the `proj.>` query endpoints."""
    run_until_signal(
        lambda stop: serve(nats_url_from_env(nats_url), db, stop, metrics_port=metrics_port, metrics_host=metrics_host)
    )


@app.command
def replay(
    *,
    nats_url: NatsUrlFlag = None,
    db: Path = Path(".data/projections.db"),
    until_seq: int | None = None,
    until_time: str | None = None,
) -> None:
    """Rebuild the read-model database from the streams; for a past state, up to `--until-seq` of JOBS, or
    every stream as it was at `--until-time` (RFC 3339), into a `--db` of your choice to query with SQL."""
    setup_logging()
    url = nats_url_from_env(nats_url)
    until = None
    if until_time is not None:
        try:
            if until_seq is not None:
                raise BadRequest("give --until-seq or --until-time, not both")
            until = asyncio.run(positions_at(url, parse_time(until_time, "--until-time"), FOLDED_STREAMS))
        except BadRequest as exc:
            Console(stderr=True).print(f"[red]replay: {exc.message}[/]")
            sys.exit(2)
    positions = asyncio.run(rebuild(url, db, until_seq, until=until))
    Console(stderr=True).print(f"rebuilt [bold]{db}[/] at positions {positions}")


@app.command
def retention(
    *,
    older_than_s: Annotated[float, Parameter(validator=validators.Number(gte=0))],
    out: Path | None = None,
    nats_url: NatsUrlFlag = None,
    db: Path = Path(".data/projections.db"),
) -> None:
    """Archive the jobs that finished more than OLDER_THAN_S seconds ago (their messages to `--out` or
    the `archive` object store, their rows as a snapshot there) and purge them from JOBS."""
    setup_logging()
    console = Console(stderr=True)
    try:
        retained = asyncio.run(_retain(nats_url_from_env(nats_url), db, older_than_s, out))
    except PlatformError as exc:
        console.print(f"[red]retention: {exc.message}[/]")
        sys.exit(1)
    if not retained.jobs:
        console.print(f"no job finished more than {older_than_s:g}s ago")
        return
    console.print(
        f"archived {retained.jobs} jobs ({retained.messages} messages) to {retained.archive}, "
        f"their rows to {retained.snapshot}; purged them from JOBS"
    )


async def _retain(url: str, db: Path, older_than_s: float, out: Path | None) -> Retained:
    nc = await connect(url, name="projections-retention")
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        return await archive_finished_jobs(js, db, older_than_s, out)
    finally:
        await nc.close()


@app.command
def status(*, nats_url: NatsUrlFlag = None, data_dir: Path = Path(".data")) -> None:
    """Each read model's version, each stream's position and lag, and an upgrade's progress (`proj.status`)."""
    setup_logging("WARNING")
    try:
        report = asyncio.run(_ask_status(platform_url(data_dir, nats_url)))
    except (PlatformError, CliError) as exc:
        Console(stderr=True).print(f"[red]projections status: {exc}[/]")
        sys.exit(1)
    Console().print(render_status(report))


async def _ask_status(url: str) -> ProjectionsStatus:
    nc = await connect(url, name="projections-status", wait_s=10)
    try:
        return await request(nc, subjects.PROJ_STATUS, GetProjectionsStatus(), ProjectionsStatus)
    finally:
        await nc.close()


def render_status(report: ProjectionsStatus) -> Group:
    models = Table("read model", "version", "serving", title=f"read models in {report.db}")
    for model in report.models:
        serving = "" if model.serving_version is None else str(model.serving_version)
        models.add_row(model.name, str(model.version), serving if model.serving_version == model.version else f"[yellow]{serving}[/]")
    streams = Table("stream", "position", "last seq", "lag")
    for stream in report.streams:
        streams.add_row(stream.stream, f"{stream.position:,}", f"{stream.last_seq:,}", f"{stream.lag:,}")
    parts: list[Table | str] = [models, streams]
    if (upgrade := report.upgrade) is not None:
        done = sum(upgrade.positions.values())
        total = sum(upgrade.targets.values()) or 1
        parts.append(
            f"upgrade in progress into {upgrade.path}: {min(done / total, 1):.0%} of the log folded "
            f"({', '.join(f'{s} {upgrade.positions.get(s, 0):,}/{t:,}' for s, t in upgrade.targets.items())}); "
            "reads are answered from the previous version until it has caught up"
        )
    else:
        parts.append("no upgrade in progress")
    return Group(*parts)


if __name__ == "__main__":
    app()
