"""The log as history: its records with their sequences and times, the sequence a moment corresponds to,
and the platform folded up to a point with the core's own `sdk.jobs.apply` and `sdk.workers.apply_worker`.

Time travel (the gateway's `at_seq` / `at_time` reads), `gpuctl events`, `gpuctl verify` (`sdk.verify`)
and `gpuctl replay --until-time` all read through here, so they agree on what "the log up to T" means:
every message the server stored at or before T, by the server's own timestamp (one clock, monotonic per
stream), not the `at_ms` a writer put into the event.

`Fold` applies records like the projections do (an event the core refuses is left out of the state),
and notes each refusal as a `Violation`, classified for people: an impossible transition, a second
terminal event, an outcome from a superseded attempt, an assignment to a worker that was not alive.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any, NamedTuple

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from sdk import subjects
from sdk.connection import connect
from sdk.errors import BadRequest, InvalidTransition, StaleAttempt, Unavailable
from sdk.events import (
    JobAssigned,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobExpired,
    JobFailed,
    JobProgress,
    JobStarted,
    WorkerEvent,
    job_event_decoder,
    worker_event_decoder,
)
from sdk.jobs import Job, apply
from sdk.log import FEED_IDLE_HEARTBEAT_S
from sdk.workers import WorkerState, WorkerStatus, apply_worker

logger = logging.getLogger(__name__)

#: Messages read ahead of the fold; a full queue holds the consumer back (JetStream's flow control).
READ_AHEAD = 10_000
#: Reading stops with an error when a stream delivers nothing for this long before its end.
READ_IDLE_S = 10.0

#: RFC 3339: a date, `T` (or a space), a time, and an offset or `Z`; a time without offset is ambiguous.
RFC3339_PATTERN = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$"
_RFC3339 = re.compile(RFC3339_PATTERN)


def parse_time(text: str, name: str = "at_time") -> dt.datetime:
    """An RFC 3339 time (`2026-11-30T03:00:00Z`), as an aware datetime; `BadRequest` naming `text` else."""
    if not _RFC3339.fullmatch(text):
        raise BadRequest(f"{name} {text!r} is not an RFC 3339 time such as 2026-11-30T03:00:00Z", {name: text})
    fraction = re.search(r"\.(\d+)", text)
    # Python keeps microseconds: cut a longer fraction instead of refusing it.
    normal = text.replace(fraction.group(0), "." + fraction.group(1)[:6].ljust(6, "0")) if fraction else text
    try:
        return dt.datetime.fromisoformat(normal.upper().replace("Z", "+00:00").replace(" ", "T"))
    except ValueError:
        raise BadRequest(f"{name} {text!r} is not a valid time", {name: text}) from None


class LogRecord(NamedTuple):
    """One message of a history stream."""

    stream: str
    seq: int
    subject: str
    #: When the server stored it (UTC).
    time: dt.datetime
    #: The `Event-Type` header ("" when a message has none).
    type: str
    data: bytes


async def stream_end(js: JetStreamContext, stream: str) -> int:
    """The stream's last sequence (0: never written)."""
    return (await js.stream_info(stream)).state.last_seq


async def seq_at_time(js: JetStreamContext, stream: str, at: dt.datetime) -> int:
    """The last sequence `stream` had stored at `at` (0, or the one before its first message, when none):
    a binary search of direct gets, about 20 for a million messages."""
    state = (await js.stream_info(stream)).state
    lo, hi = state.first_seq - 1, state.last_seq  # the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            # The first message at or after `mid` (a deleted sequence has none of its own).
            msg = await js.get_msg(stream, seq=mid, subject=">", next=True, direct=True)
        except NotFoundError:
            hi = mid - 1
            continue
        if msg.seq is not None and msg.seq <= hi and msg.time is not None and msg.time <= at:
            lo = msg.seq
        else:
            hi = mid - 1
    return lo


async def positions_at(nats_url: str, at: dt.datetime, streams: Iterable[str]) -> dict[str, int]:
    """Each stream's last sequence stored by `at` (what `projections replay --until-time` rebuilds to)."""
    nc = await connect(nats_url, name="positions-at")
    try:
        return {stream: await seq_at_time(nc.jetstream(), stream, at) for stream in streams}
    finally:
        await nc.close()


async def read_log(
    js: JetStreamContext,
    stream: str,
    *,
    after_seq: int = 0,
    until_seq: int | None = None,
    follow: bool = False,
) -> AsyncIterator[LogRecord]:
    """The records of `stream` after `after_seq`, oldest first, up to `until_seq` (default: the end when
    the read starts), or forever with `follow`. One ordered consumer: nothing is acknowledged or kept."""
    if not follow:
        state = (await js.stream_info(stream)).state
        until_seq = state.last_seq if until_seq is None else min(until_seq, state.last_seq)
        if until_seq <= after_seq or not state.messages or state.first_seq > until_seq:
            return  # nothing to deliver: a consumer would only wait
    queue: asyncio.Queue[Msg] = asyncio.Queue(READ_AHEAD)
    if after_seq:
        start = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1)
    else:
        start = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)
    # A short idle heartbeat, as the services' feeds: a follower outlives a restarted broker within a second.
    sub = await js.subscribe(
        subjects.STREAM_SUBJECTS[stream], stream=stream, cb=queue.put, ordered_consumer=True, config=start,
        idle_heartbeat=FEED_IDLE_HEARTBEAT_S,
    )
    try:
        while True:
            try:
                msg = await (queue.get() if follow else asyncio.wait_for(queue.get(), READ_IDLE_S))
            except TimeoutError:
                raise Unavailable(f"{stream} delivered nothing for {READ_IDLE_S:g}s before #{until_seq}") from None
            meta = msg.metadata
            seq = meta.sequence.stream
            if until_seq is not None and seq > until_seq:
                return
            yield LogRecord(
                stream, seq, msg.subject, meta.timestamp, (msg.headers or {}).get(subjects.EVENT_TYPE_HEADER, ""),
                msg.data,
            )
            # Done at the target, or earlier when the stream holds nothing more (messages deleted at the end).
            if until_seq is not None and (seq >= until_seq or meta.num_pending == 0):
                return
    finally:
        await sub.unsubscribe()


async def read_merged(js: JetStreamContext, ends: dict[str, int]) -> list[LogRecord]:
    """Every record of the streams in `ends` (stream -> last sequence to read), in the order the server
    stored them (by time; a tie keeps each stream's own order)."""
    records: list[LogRecord] = []
    for stream, end in ends.items():
        records.extend([record async for record in read_log(js, stream, until_seq=end)])
    records.sort(key=lambda r: r.time)  # stable: equal times keep their stream order
    return records


# --- Folding, with what the core refused ---------------------------------------------------------


class Violation(msgspec.Struct, frozen=True, kw_only=True):
    """Something in the log (or a read model) that a sound platform never produces."""

    #: `invalid_transition`, `duplicate_terminal`, `stale_attempt`, `dead_worker`, `undecodable`,
    #: `wrong_subject`, `read_model`.
    kind: str
    stream: str
    seq: int
    subject: str
    message: str


#: Events that end a job: a job gets exactly one.
TERMINAL_EVENTS = (JobCompleted, JobFailed, JobCancelled, JobExpired)
#: A worker's reports about one attempt of a job.
ATTEMPT_REPORTS = (JobStarted, JobProgress, JobCompleted, JobFailed)
#: Statuses in which a worker may be given a job (a draining worker may have been chosen just before).
ALIVE = frozenset({WorkerStatus.ONLINE, WorkerStatus.DRAINING})


class Fold:
    """The platform's jobs and workers, folded record by record with the core's own functions."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.workers: dict[str, WorkerState] = {}
        self.violations: list[Violation] = []

    def add_all(self, records: Iterable[LogRecord]) -> Fold:
        for record in records:
            self.add(record)
        return self

    def add(self, record: LogRecord) -> None:
        """Apply one record of JOBS or WORKERS (others are ignored); a refused event changes nothing."""
        try:
            match record.stream:
                case subjects.JOBS_STREAM:
                    self._add_job_event(record, job_event_decoder.decode(record.data))
                case subjects.WORKERS_STREAM:
                    self._add_worker_event(record, worker_event_decoder.decode(record.data))
        except msgspec.DecodeError as exc:
            self._note("undecodable", record, f"not an event of {record.stream}: {exc}")

    def _add_job_event(self, record: LogRecord, event: JobEvent) -> None:
        if record.subject != subjects.job_subject(event.job_id):
            self._note("wrong_subject", record, f"{type(event).__name__} of job {event.job_id} on {record.subject}")
            return
        job = self.jobs.get(event.job_id)
        if isinstance(event, JobAssigned):
            worker = self.workers.get(event.worker_id)
            if worker is None or worker.status not in ALIVE:
                state = "never registered" if worker is None or worker.status is None else worker.status.value
                self._note("dead_worker", record, f"job {event.job_id} assigned to worker {event.worker_id}, {state}")
        try:
            self.jobs[event.job_id] = apply(job, event, record.seq)
        except (InvalidTransition, StaleAttempt) as exc:
            self._note(_job_refusal(job, event), record, f"{type(event).__name__}: {exc.message}")

    def _add_worker_event(self, record: LogRecord, event: WorkerEvent) -> None:
        if record.subject != subjects.worker_subject(event.worker_id):
            self._note("wrong_subject", record, f"{type(event).__name__} of worker {event.worker_id} on {record.subject}")
            return
        try:
            self.workers[event.worker_id] = apply_worker(self.workers.get(event.worker_id), event, record.seq)
        except InvalidTransition as exc:
            self._note("invalid_transition", record, f"{type(event).__name__}: {exc.message}")

    def _note(self, kind: str, record: LogRecord, message: str) -> None:
        self.violations.append(Violation(kind=kind, stream=record.stream, seq=record.seq, subject=record.subject, message=message))


def _job_refusal(job: Job | None, event: JobEvent) -> str:
    """What kind of violation a refused job event is."""
    if job is not None and job.status.terminal and isinstance(event, TERMINAL_EVENTS):
        return "duplicate_terminal"
    if job is not None and isinstance(event, ATTEMPT_REPORTS) and event.attempt != job.attempt:
        return "stale_attempt"
    return "invalid_transition"


async def fold_until(js: JetStreamContext, ends: dict[str, int]) -> Fold:
    """JOBS and WORKERS folded up to the sequences in `ends` (missing: not read)."""
    return Fold().add_all(await read_merged(js, ends))


async def read_subject_log(js: JetStreamContext, stream: str, subject: str, until_seq: int | None = None) -> list[LogRecord]:
    """Every record on one subject (a job's, a worker's) up to `until_seq`, oldest first, by direct gets."""
    records: list[LogRecord] = []
    seq = 1
    while until_seq is None or seq <= until_seq:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True, direct=True)
        except NotFoundError:
            break
        assert msg.seq is not None and msg.time is not None  # a direct get's headers carry both
        if until_seq is not None and msg.seq > until_seq:
            break
        kind = (msg.headers or {}).get(subjects.EVENT_TYPE_HEADER, "")
        records.append(LogRecord(stream, msg.seq, subject, msg.time, kind, msg.data or b""))
        seq = msg.seq + 1
    return records


async def fold_subject(js: JetStreamContext, stream: str, subject: str, until_seq: int | None = None) -> Fold:
    """One job's or worker's subject folded up to `until_seq` (default: now), refused events left out."""
    return Fold().add_all(await read_subject_log(js, stream, subject, until_seq))


async def fold_job(js: JetStreamContext, job_id: str, until_seq: int | None = None) -> Job | None:
    """One job as it was at JOBS sequence `until_seq` (default: now)."""
    return (await fold_subject(js, subjects.JOBS_STREAM, subjects.job_subject(job_id), until_seq)).jobs.get(job_id)


def describe(record: LogRecord) -> dict[str, Any]:
    """A record's event as plain values (for JSON lines and tables); `{}` when it does not decode."""
    decoder = {subjects.JOBS_STREAM: job_event_decoder, subjects.WORKERS_STREAM: worker_event_decoder}.get(record.stream)
    if decoder is None:
        return msgspec.json.decode(record.data) if record.data else {}
    try:
        return msgspec.to_builtins(decoder.decode(record.data))
    except msgspec.DecodeError:
        return {}
