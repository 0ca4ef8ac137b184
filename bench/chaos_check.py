"""The chaos suite's checker: what the log and the read models say after components were killed.

It reads JOBS as it is stored (every event with the time the broker stored it) and folds it strictly,
with the one `sdk.jobs.apply`, and reports:

- lost: a job the platform acknowledged (a 201 or a NATS reply with its id) that is not in the log, or
  never reached a terminal event;
- doubled: a job with more than one terminal event, or more than one `JobCompleted`;
- refused: an event in the log that `apply` refuses, i.e. an outcome of a superseded attempt (or any
  impossible transition) that a writer accepted and appended anyway;
- live workers declared lost: a worker that was not killed but was declared lost (its jobs requeued,
  run again, an attempt spent) because the platform, not the worker, went quiet;
- recovery: from a kill until the platform placed an instant job (an echo that does not sleep; its
  `JobAssigned` stored after the kill) and completed it; and how long the jobs a killed worker held took to be taken back (requeued or ended);
- read models: each projections database equals a fresh fold of the log up to the positions it has
  applied (`projections.replay.rebuild`), compared row by row, read in one transaction.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiosqlite
import msgspec
from nats.js import JetStreamContext

from projections.feed import FOLDED_STREAMS
from projections.replay import rebuild
from sdk import subjects
from sdk.errors import InvalidTransition, StaleAttempt
from sdk.events import (
    JobAssigned,
    JobCompleted,
    JobEvent,
    JobRequeued,
    WorkerLost,
    job_event_decoder,
    worker_event_decoder,
)
from sdk.history import TERMINAL_EVENTS, read_log
from sdk.jobs import HELD_BY_WORKER, Job, JobStatus, apply
from sdk.workers import WorkerState

#: The workers' columns folded from WORKERS. The others are the latest heartbeat's telemetry, which
#: HEARTBEATS keeps two messages deep: a refold cannot see a heartbeat that a newer one has replaced
#: since, so those columns are not a function of the retained log (`projections/store.py`).
WORKER_LIFECYCLE_COLUMNS = tuple(f.name for f in msgspec.structs.fields(WorkerState))


class Entry(msgspec.Struct, frozen=True):
    """One event of JOBS, with its stream sequence and when the broker stored it (epoch seconds)."""

    seq: int
    stored_at_s: float
    event: JobEvent


@dataclass
class JobAudit:
    """One job's history, folded strictly."""

    job: Job | None = None
    terminals: int = 0
    completions: int = 0
    #: Events in the log that `apply` refuses, as "#seq Type: reason".
    refused: list[str] = field(default_factory=list)
    #: When each attempt was assigned (stored time of its `JobAssigned`).
    assigned_at_s: dict[int, float] = field(default_factory=dict)
    #: The attempt that completed, and when.
    completed: tuple[int, float] | None = None

    def add(self, entry: Entry) -> None:
        event = entry.event
        try:
            self.job = apply(self.job, event, entry.seq)
        except (InvalidTransition, StaleAttempt) as exc:
            self.refused.append(f"#{entry.seq} {type(event).__name__}: {exc}")
            return
        if isinstance(event, TERMINAL_EVENTS):
            self.terminals += 1
        match event:
            case JobAssigned():
                self.assigned_at_s[event.attempt] = entry.stored_at_s
            case JobCompleted():
                self.completions += 1
                self.completed = (event.attempt, entry.stored_at_s)


@dataclass
class Audit:
    jobs: dict[str, JobAudit] = field(default_factory=dict)

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Audit:
        audit = cls()
        for entry in entries:
            audit.jobs.setdefault(entry.event.job_id, JobAudit()).add(entry)
        return audit

    def lost(self, acknowledged: Iterable[str]) -> list[str]:
        """Acknowledged jobs missing from the log or without a terminal event."""
        return [job_id for job_id in acknowledged if job_id not in self.jobs or self.jobs[job_id].terminals == 0]

    def doubled(self) -> list[str]:
        return [job_id for job_id, a in self.jobs.items() if a.terminals > 1 or a.completions > 1]

    def refused(self) -> list[str]:
        return [f"job {job_id} {line}" for job_id, a in self.jobs.items() for line in a.refused]

    def failed(self) -> list[str]:
        return [job_id for job_id, a in self.jobs.items() if a.job is not None and a.job.status is JobStatus.FAILED]

    def unfinished(self, job_ids: Iterable[str]) -> list[str]:
        return [job_id for job_id in job_ids if job_id not in self.jobs or not self.jobs[job_id].terminals]


def recovery_s(audit: Audit, kill_at_s: float) -> float | None:
    """From the kill until the first instant job placed after it completed (None: none did). Only echo
    jobs that do not sleep count, so the figure is the platform's time and not a job's own run time."""
    done = [
        completed_at - kill_at_s
        for a in audit.jobs.values()
        if a.completed is not None and a.job is not None and _instant(a.job)
        for attempt, completed_at in [a.completed]
        if a.assigned_at_s.get(attempt, 0.0) > kill_at_s
    ]
    return min(done, default=None)


def _instant(job: Job) -> bool:
    return job.type == "echo" and not job.params.get("sleep_s")


def held_by(entries: Iterable[Entry], worker_ids: set[str], at_s: float) -> set[str]:
    """The jobs assigned to or running on `worker_ids` at `at_s` (folded from the entries stored before)."""
    jobs = Audit.of(e for e in entries if e.stored_at_s <= at_s).jobs
    return {
        job_id for job_id, a in jobs.items()
        if a.job is not None and a.job.status in HELD_BY_WORKER and a.job.worker_id in worker_ids
    }


def taken_back_s(entries: Iterable[Entry], job_ids: set[str], kill_at_s: float) -> float | None:
    """From the kill until the last of `job_ids` left its dead worker: requeued, or ended (None: none held)."""
    left: dict[str, float] = {}
    for entry in entries:
        job_id = entry.event.job_id
        if job_id in job_ids and job_id not in left and entry.stored_at_s > kill_at_s:
            if isinstance(entry.event, (JobRequeued, *TERMINAL_EVENTS)):
                left[job_id] = entry.stored_at_s - kill_at_s
    if not job_ids:
        return None
    return max(left.values()) if len(left) == len(job_ids) else float("inf")


# --- Reading the log -------------------------------------------------------------------------------


async def read_jobs_log(js: JetStreamContext, after_seq: int = 0) -> list[Entry]:
    """Every event of JOBS after `after_seq`, up to the stream's end when the read starts."""
    return [
        Entry(record.seq, record.time.timestamp(), job_event_decoder.decode(record.data))
        async for record in read_log(js, subjects.JOBS_STREAM, after_seq=after_seq)
    ]


async def workers_declared_lost(js: JetStreamContext, after_seq: int) -> dict[str, float]:
    """The workers declared lost after `after_seq` of WORKERS, with when (the first time each)."""
    lost: dict[str, float] = {}
    async for record in read_log(js, subjects.WORKERS_STREAM, after_seq=after_seq):
        event = worker_event_decoder.decode(record.data)
        if isinstance(event, WorkerLost):
            lost.setdefault(event.worker_id, record.time.timestamp())
    return lost


# --- Read models against a fresh fold --------------------------------------------------------------


class Snapshot(msgspec.Struct):
    positions: dict[str, int]
    jobs: list[tuple[object, ...]]
    workers: list[tuple[object, ...]]


async def snapshot(db_path: Path) -> Snapshot:
    """The positions and rows of a read-model database, in one read transaction (the live service keeps
    writing; rows read after the positions would be ahead of them)."""
    columns = ", ".join(WORKER_LIFECYCLE_COLUMNS)
    async with aiosqlite.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        await db.execute("BEGIN")
        positions = dict(await db.execute_fetchall("SELECT stream, seq FROM positions"))
        jobs = list(await db.execute_fetchall("SELECT * FROM jobs ORDER BY id"))
        # Workers known from heartbeats only are not registered: no reader sees them.
        workers = list(
            await db.execute_fetchall(f"SELECT {columns} FROM workers WHERE status IS NOT NULL ORDER BY id")
        )
        await db.execute("COMMIT")
    return Snapshot(positions, [tuple(r) for r in jobs], [tuple(r) for r in workers])  # type: ignore[arg-type]


async def read_model_differences(nats_url: str, db_path: Path) -> list[str]:
    """How the database at `db_path` differs from a fresh fold of the log up to the positions it has
    applied: one line per differing row (empty: equal)."""
    live = await snapshot(db_path)
    with tempfile.TemporaryDirectory(prefix="chaos-refold-") as scratch_dir:
        scratch = Path(scratch_dir) / "refold.db"
        await rebuild(nats_url, scratch, until={s: live.positions.get(s, 0) for s in FOLDED_STREAMS})
        fresh = await snapshot(scratch)
    differences = []
    for table, mine, theirs in (("jobs", live.jobs, fresh.jobs), ("workers", live.workers, fresh.workers)):
        by_id, fresh_by_id = {row[0]: row for row in mine}, {row[0]: row for row in theirs}
        for row_id in sorted(by_id.keys() | fresh_by_id.keys(), key=str):
            if by_id.get(row_id) != fresh_by_id.get(row_id):
                differences.append(f"{db_path.name} {table} {row_id}: {by_id.get(row_id)} != {fresh_by_id.get(row_id)}")
    return differences
