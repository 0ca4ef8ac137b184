"""`gpuctl events tail|show` and `gpuctl verify`: the log, read by its operator.

These read the streams themselves, so they connect to NATS as the `platform` user, like the services
and `gpuctl replay`: the URL is `--nats-url` / `NATS_URL` (default `nats://127.0.0.1:4222`), and when
it names no user gpuctl adds `platform` with the password in the data dir's `secrets/nats.env` (the
machine that runs `gpuctl up`). Nothing here imports a service (`sdk.history`, `sdk.verify`).

Exit statuses: 0 done (verify: sound); 1 verify found violations, or a job or worker that does not
exist; 2 bad input (an unknown event type, a bad `--since`) or a platform that cannot be reached.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
from cyclopts import App, Parameter, validators
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from rich.console import Console
from rich.table import Table

from sdk import subjects
from sdk.broker import password_variable, read_nats_env
from sdk.connection import DEFAULT_NATS_URL, connect, redact, with_user
from sdk.errors import PlatformError
from sdk.events import JobEvent, WorkerEvent
from sdk.history import (
    Fold,
    LogRecord,
    describe,
    parse_time,
    read_log,
    read_subject_log,
    seq_at_time,
    stream_end,
)
from sdk.local import SECRETS_DIR
from sdk.process import setup_logging
from sdk.verify import verify as verify_log

T = TypeVar("T")

console = Console(stderr=True)
out = Console(highlight=False)

#: Every event type of the log, by its tag (what `--type` accepts).
JOB_TYPES = tuple(sorted(kind.__struct_config__.tag for kind in JobEvent.__args__))  # type: ignore[attr-defined]
WORKER_TYPES = tuple(sorted(kind.__struct_config__.tag for kind in WorkerEvent.__args__))  # type: ignore[attr-defined]
#: Fields every event has, or that the subject already says: left out of a row's details.
_ROUTINE = frozenset({"type", "v", "at_ms", "job_id", "params", "result"})
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

DataDir = Annotated[Path, Parameter(help="The platform's data dir: the `platform` user's password in its `secrets/nats.env`.")]
NatsUrl = Annotated[
    str | None,
    Parameter(env_var="NATS_URL", help=f"The NATS server (default {DEFAULT_NATS_URL}); without a user in it, "
              "gpuctl connects as `platform` with the password in the data dir."),
]

events = App(name="events", help="Browse the event log: `tail` the streams, `show` one job's history.")


class CliError(Exception):
    """A message for the operator, and the exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def platform_url(data_dir: Path, nats_url: str | None) -> str:
    """The URL to reach the streams as the `platform` user."""
    url = nats_url or DEFAULT_NATS_URL
    if "@" in url:
        return url
    password = read_nats_env(data_dir / SECRETS_DIR).get(password_variable("platform"))
    if not password:
        raise CliError(f"no NATS password for `platform` in {data_dir / SECRETS_DIR}; set NATS_URL with the user in it")
    return with_user(url, "platform", password)


def _run(data_dir: Path, nats_url: str | None, action: Callable[[NatsClient], Awaitable[T]]) -> T:
    """Run `action` on a platform connection; a `CliError` or a platform error is a message and its status."""
    setup_logging("WARNING")

    async def run() -> T:
        url = platform_url(data_dir, nats_url)
        nc = await connect(url, name="gpuctl", wait_s=5)
        try:
            return await action(nc)
        finally:
            await nc.close()

    try:
        return asyncio.run(run())
    except CliError as exc:
        console.print(f"[red]gpuctl: {exc}[/]")
        sys.exit(exc.status)
    except PlatformError as exc:
        console.print(f"[red]gpuctl: {exc.message} ({redact(nats_url or DEFAULT_NATS_URL)})[/]")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(0)


# --- gpuctl events tail ----------------------------------------------------------------------------


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """`10m`, `90s`, `2h`, `1d`, `500ms` ago, or an RFC 3339 time."""
    if match := _DURATION.fullmatch(text):
        return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=float(match[1]) * _UNIT_S[match[2]])
    try:
        return parse_time(text, "--since")
    except PlatformError:
        raise CliError(f"--since {text!r} is neither a duration (10m, 90s, 2h, 1d) nor an RFC 3339 time") from None


def _matches(record: LogRecord, event: dict[str, Any], kind: str | None, job: str | None, worker: str | None) -> bool:
    if kind is not None and record.type != kind:
        return False
    if job is not None and record.subject != subjects.job_subject(job):
        return False
    return worker is None or record.subject == subjects.worker_subject(worker) or event.get("worker_id") == worker


def details(event: dict[str, Any]) -> str:
    """The fields that matter of an event, as `key=value` pairs."""
    parts = []
    for key, value in event.items():
        if key in _ROUTINE or value in (None, (), [], {}):
            continue
        if key == "error" and isinstance(value, dict):
            value = f"{value.get('code')}: {value.get('message')}"
        parts.append(f"{key.removesuffix('_id')}={value}")
    text = " ".join(parts)
    return text if len(text) <= 100 else text[:99] + "…"


def _row(record: LogRecord, event: dict[str, Any]) -> tuple[str, str, str, str, str]:
    return (record.time.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3], str(record.seq), record.subject, record.type or "?", details(event))


def _json_line(record: LogRecord, event: dict[str, Any]) -> str:
    return json.dumps({
        "time": record.time.isoformat(), "stream": record.stream, "seq": record.seq, "subject": record.subject,
        "type": record.type, "event": event,
    })


async def _exists(js: JetStreamContext, stream: str, subject: str) -> bool:
    try:
        await js.get_msg(stream, subject=subject, direct=True)
    except NotFoundError:
        return False
    return True


async def _backlog(js: JetStreamContext, streams: list[str], after: dict[str, int]) -> list[LogRecord]:
    """The streams' records after `after` up to now, merged by time."""
    return sorted([r for stream in streams async for r in read_log(js, stream, after_seq=after[stream])], key=lambda r: r.time)


async def _follow(js: JetStreamContext, after: dict[str, int]) -> AsyncIterator[LogRecord]:
    """The streams' records after `after`, as they are appended (each stream in its order), forever."""
    live: asyncio.Queue[LogRecord] = asyncio.Queue()

    async def pump(stream: str) -> None:
        async for record in read_log(js, stream, after_seq=after[stream], follow=True):
            await live.put(record)

    pumps = [asyncio.create_task(pump(stream)) for stream in after]
    try:
        while True:
            yield await live.get()
    finally:
        for task in pumps:
            task.cancel()


@events.command(name="tail")
def tail(
    *,
    follow: Annotated[bool, Parameter(name=["--follow", "-f"])] = False,
    type: Annotated[str | None, Parameter(help="Only events of this type (`job.failed`, `worker.lost`, ...).")] = None,
    job: Annotated[str | None, Parameter(help="Only this job's events.")] = None,
    worker: Annotated[str | None, Parameter(help="Only this worker's events, and the job events that name it.")] = None,
    since: Annotated[str | None, Parameter(help="From this long ago (`10m`, `2h`) or this RFC 3339 time.")] = None,
    lines: Annotated[int, Parameter(name=["--lines", "-n"], validator=validators.Number(gte=1))] = 20,
    json_lines: Annotated[bool, Parameter(name="--json", help="One JSON object per line.")] = False,
    data_dir: DataDir = Path(".data"),
    nats_url: NatsUrl = None,
) -> None:
    """The last LINES events of JOBS and WORKERS (with --since: every one since then), oldest first, as a
    table or JSON lines; with --follow, then every new one as it is appended, until Ctrl-C."""
    if type is not None and type not in JOB_TYPES + WORKER_TYPES:
        _fail(f"unknown event type {type!r}; one of: {', '.join(JOB_TYPES + WORKER_TYPES)}")
    try:
        start = parse_since(since) if since is not None else None
    except CliError as exc:
        _fail(str(exc))
    streams = [subjects.JOBS_STREAM, subjects.WORKERS_STREAM]
    if job is not None or (type is not None and type in JOB_TYPES):
        streams = [subjects.JOBS_STREAM]
    elif type is not None:
        streams = [subjects.WORKERS_STREAM]

    async def run(nc: NatsClient) -> None:
        js = nc.jetstream()
        if job is not None and not await _exists(js, subjects.JOBS_STREAM, subjects.job_subject(job)):
            raise CliError(f"unknown job id {job!r}", 1)
        if worker is not None and not await _exists(js, subjects.WORKERS_STREAM, subjects.worker_subject(worker)):
            raise CliError(f"unknown worker id {worker!r}", 1)
        after: dict[str, int] = {}
        for stream in streams:
            if start is not None:
                after[stream] = await seq_at_time(js, stream, start - dt.timedelta(microseconds=1))
            elif type is None and worker is None and job is None:
                after[stream] = max(0, await stream_end(js, stream) - lines)  # no filter: the last lines suffice
            else:
                after[stream] = 0
        if job is not None:  # one subject: direct gets, not the whole stream
            backlog = await read_subject_log(js, subjects.JOBS_STREAM, subjects.job_subject(job))
            backlog = [r for r in backlog if r.seq > after[subjects.JOBS_STREAM]]
        else:
            backlog = await _backlog(js, streams, after)
        matching = [(r, e) for r in backlog if _matches(r, e := describe(r), type, job, worker)]
        _print(matching if since else matching[-lines:], json_lines)
        if follow:
            reached = {s: max([after[s], *(r.seq for r in backlog if r.stream == s)]) for s in streams}
            async for record in _follow(js, reached):
                if _matches(record, event := describe(record), type, job, worker):
                    _print([(record, event)], json_lines, header=False)

    _run(data_dir, nats_url, run)


def _print(rows: Iterable[tuple[LogRecord, dict[str, Any]]], json_lines: bool, header: bool = True) -> None:
    if json_lines:
        for record, event in rows:
            print(_json_line(record, event), flush=True)
        return
    table = Table("time (UTC)", "seq", "subject", "type", "details", show_header=header)
    for record, event in rows:
        table.add_row(*_row(record, event))
    out.print(table)


def _fail(message: str, status: int = 2) -> None:
    console.print(f"[red]gpuctl: {message}[/]")
    sys.exit(status)


# --- gpuctl events show ----------------------------------------------------------------------------


def _ms(delta: dt.timedelta) -> str:
    ms = delta.total_seconds() * 1000
    return f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


@events.command(name="show")
def show(job_id: str, /, *, json_lines: Annotated[bool, Parameter(name="--json")] = False,
         data_dir: DataDir = Path(".data"), nats_url: NatsUrl = None) -> None:
    """One job's history: each event with the time since the one before (queued, assigned -> started, ...),
    its worker and attempt, and the job's outcome."""

    async def run(nc: NatsClient) -> None:
        records = await read_subject_log(nc.jetstream(), subjects.JOBS_STREAM, subjects.job_subject(job_id))
        if not records:
            raise CliError(f"unknown job id {job_id!r}", 1)
        fold = Fold().add_all(records)
        if json_lines:
            for record in records:
                print(_json_line(record, describe(record)))
            return
        table = Table("time (UTC)", "seq", "event", "after", "worker", "attempt", "details", title=f"job {job_id}")
        previous: LogRecord | None = None
        for record in records:
            event = describe(record)
            step = f"{previous.type.removeprefix('job.')} -> {record.type.removeprefix('job.')} {_ms(record.time - previous.time)}" if previous else ""
            table.add_row(
                record.time.strftime("%H:%M:%S.%f")[:-3], str(record.seq), record.type, step,
                str(event.get("worker_id") or ""), str(event.get("attempt") or ""),
                details({k: v for k, v in event.items() if k not in ("worker_id", "attempt")}),
            )
            previous = record
        out.print(table)
        job = fold.jobs.get(job_id)
        if job is not None:
            took = _ms(records[-1].time - records[0].time)
            where = f" on worker {job.worker_id}" if job.worker_id else ""
            out.print(f"outcome: [bold]{job.status.value}[/] at attempt {job.attempt}{where}, {took} after submission")
            if job.error is not None:
                out.print(f"error: {job.error.code}: {job.error.message}")
        for violation in fold.violations:
            out.print(f"[red]refused by the fold: #{violation.seq} {violation.message}[/]")

    _run(data_dir, nats_url, run)


# --- gpuctl verify ---------------------------------------------------------------------------------


def verify(
    *,
    read_models: Annotated[bool, Parameter(help="Also compare the projections' read models with a fresh fold.")] = True,
    json_lines: Annotated[bool, Parameter(name="--json", help="One JSON object per violation.")] = False,
    data_dir: DataDir = Path(".data"),
    nats_url: NatsUrl = None,
) -> None:
    """Fold the whole log with the core's own functions and report every violation with its sequence and
    subject; exit 0 when the log and the read models are sound, 1 with the list otherwise."""
    violations = _run(data_dir, nats_url, lambda nc: verify_log(nc, read_models=read_models))
    if json_lines:
        for violation in violations:
            print(msgspec.json.encode(violation).decode())
    elif violations:
        table = Table("stream", "seq", "subject", "kind", "what", title=f"{len(violations)} violations")
        for v in violations:
            table.add_row(v.stream, str(v.seq), v.subject, v.kind, v.message)
        out.print(table)
    else:
        out.print("sound: every event folds, and the read models equal a fresh fold" if read_models else "sound: every event folds")
    sys.exit(1 if violations else 0)
