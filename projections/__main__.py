"""`python -m projections`: the SQLite read models and the `proj.>` query endpoints, until SIGINT/SIGTERM
(or until the supervisor that started it is gone); `python -m projections replay` rebuilds the database
from the streams. `gpuctl up` runs the first as a child; `gpuctl projections` and `gpuctl replay` run them."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from cyclopts import App
from rich.console import Console

from projections.feed import FOLDED_STREAMS
from projections.replay import rebuild
from projections.service import serve
from sdk.connection import nats_url_from_env
from sdk.errors import BadRequest
from sdk.history import parse_time, positions_at
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


if __name__ == "__main__":
    app()
