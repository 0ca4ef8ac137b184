"""A job's state is a pure function of its events: `state = fold(events)`.

The same `apply` runs in the scheduler, the projections, the gateway and the replay tooling, so they
can never disagree about what a sequence of events means. It refuses impossible transitions.
The gateway's decisions are pure functions here too (`decide_cancel`, `decide_report`): it loads the
job, asks which event a request stands for, and appends it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

import msgspec

from sdk.api import (
    CancelJob,
    JobReport,
    OutcomeReport,
    ReportCancelled,
    ReportCompleted,
    ReportFailed,
    ReportProgress,
    ReportStarted,
)
from sdk.errors import BadRequest, InvalidTransition, JobNotFound, StaleAttempt
from sdk.events import (
    ErrorInfo,
    JobAssigned,
    JobCancelled,
    JobCancelRequested,
    JobCompleted,
    JobEnded,
    JobEvent,
    JobExpired,
    JobFailed,
    JobProgress,
    JobRequeued,
    JobStarted,
    JobSubmitted,
    JobWebhookDelivered,
    JobWebhookFailed,
    JobWebhookRedeliveryRequested,
)


class JobStatus(str, enum.Enum):
    #: Waiting for a worker (also after a requeue).
    QUEUED = "queued"
    #: The scheduler chose a worker; the worker has not started it yet.
    ASSIGNED = "assigned"
    #: A worker reported that it started the current attempt.
    RUNNING = "running"
    #: Finished with a result (terminal).
    COMPLETED = "completed"
    #: Finished with an error, or ran out of attempts (terminal).
    FAILED = "failed"
    #: Cancelled on request (terminal).
    CANCELLED = "cancelled"
    #: Waited in the queue longer than its `timeout_s` (terminal).
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})
#: The status each ending event leaves a job in.
ENDED_STATUS: dict[type[JobEnded], JobStatus] = {
    JobCompleted: JobStatus.COMPLETED, JobFailed: JobStatus.FAILED, JobCancelled: JobStatus.CANCELLED,
    JobExpired: JobStatus.EXPIRED,
}
HELD_BY_WORKER = frozenset({JobStatus.ASSIGNED, JobStatus.RUNNING})


class Job(msgspec.Struct, kw_only=True):
    id: str
    type: str
    model: str | None
    params: dict[str, Any]
    region: str | None
    priority: int
    max_attempts: int
    timeout_s: float
    owner: str | None
    #: `nearest`, `strict` or `any`, or None for the default (`sdk.regions.effective_policy`).
    region_policy: str | None = None
    max_latency_ms: float | None = None
    #: Where the job's view is POSTed when it ends (`gateway.webhooks`).
    webhook_url: str | None = None
    status: JobStatus = JobStatus.QUEUED
    #: The attempt that runs (or will run) now; starts at 1, + 1 per requeue.
    attempt: int = 1
    worker_id: str | None = None
    result: Any = None
    error: ErrorInfo | None = None
    progress: float | None = None
    cancel_requested: bool = False
    submitted_at_ms: int = 0
    assigned_at_ms: int | None = None
    started_at_ms: int | None = None
    finished_at_ms: int | None = None
    #: JetStream sequence of the last applied event on this job's subject (for expected-sequence appends).
    seq: int = 0
    #: JetStream sequence of the `JobSubmitted` event (a stable ordering key).
    submitted_seq: int = 0


def _require(job: Job | None, event: JobEvent, allowed: frozenset[JobStatus]) -> Job:
    if job is None:
        raise InvalidTransition(f"job {event.job_id} does not exist")
    if job.status not in allowed:
        raise InvalidTransition(
            f"job {job.id} is {job.status.value}; {type(event).__name__} needs {sorted(s.value for s in allowed)}",
            {"status": job.status.value},
        )
    return job


def _require_attempt(job: Job, attempt: int, worker_id: str | None) -> None:
    if attempt != job.attempt or (worker_id is not None and worker_id != job.worker_id):
        raise StaleAttempt(
            f"job {job.id} is at attempt {job.attempt} on worker {job.worker_id}; "
            f"report was for attempt {attempt} on worker {worker_id}",
            {"attempt": job.attempt, "reported_attempt": attempt},
        )


def apply(job: Job | None, event: JobEvent, seq: int = 0) -> Job:
    """The job after `event`; a new struct, `job` is left untouched. Raises `InvalidTransition`."""
    match event:
        case JobSubmitted():
            if job is not None:
                raise InvalidTransition(f"job {event.job_id} was already submitted")
            new = Job(
                id=event.job_id,
                type=event.job_type,
                model=event.model,
                params=event.params,
                region=event.region,
                priority=event.priority,
                max_attempts=event.max_attempts,
                timeout_s=event.timeout_s,
                owner=event.owner,
                region_policy=event.region_policy,
                max_latency_ms=event.max_latency_ms,
                webhook_url=event.webhook_url,
                submitted_at_ms=event.at_ms,
                submitted_seq=seq,
            )
        case JobAssigned():
            old = _require(job, event, frozenset({JobStatus.QUEUED}))
            if event.attempt != old.attempt:
                raise StaleAttempt(f"job {old.id} is at attempt {old.attempt}, not {event.attempt}")
            new = msgspec.structs.replace(
                old, status=JobStatus.ASSIGNED, worker_id=event.worker_id, assigned_at_ms=event.at_ms
            )
        case JobStarted():
            old = _require(job, event, frozenset({JobStatus.ASSIGNED}))
            _require_attempt(old, event.attempt, event.worker_id)
            new = msgspec.structs.replace(old, status=JobStatus.RUNNING, started_at_ms=event.at_ms)
        case JobProgress():
            old = _require(job, event, frozenset({JobStatus.RUNNING}))
            _require_attempt(old, event.attempt, event.worker_id)
            new = msgspec.structs.replace(old, progress=event.progress)
        case JobCompleted():
            old = _require(job, event, HELD_BY_WORKER)
            _require_attempt(old, event.attempt, event.worker_id)
            new = msgspec.structs.replace(
                old, status=JobStatus.COMPLETED, result=event.result, finished_at_ms=event.at_ms, progress=1.0
            )
        case JobFailed():
            # A failure without a worker is the platform's verdict (attempts exhausted) and may hit a queued job.
            allowed = HELD_BY_WORKER if event.worker_id is not None else HELD_BY_WORKER | {JobStatus.QUEUED}
            old = _require(job, event, frozenset(allowed))
            if event.worker_id is not None:
                _require_attempt(old, event.attempt, event.worker_id)
            new = msgspec.structs.replace(
                old, status=JobStatus.FAILED, error=event.error, finished_at_ms=event.at_ms
            )
        case JobRequeued():
            old = _require(job, event, HELD_BY_WORKER)
            if event.attempt != old.attempt + 1:
                raise StaleAttempt(f"job {old.id} requeue must be attempt {old.attempt + 1}, not {event.attempt}")
            new = msgspec.structs.replace(
                old,
                status=JobStatus.QUEUED,
                attempt=event.attempt,
                worker_id=None,
                assigned_at_ms=None,
                started_at_ms=None,
                progress=None,
            )
        case JobCancelRequested():
            old = _require(job, event, HELD_BY_WORKER)
            new = msgspec.structs.replace(old, cancel_requested=True)
        case JobCancelled():
            old = _require(job, event, frozenset({JobStatus.QUEUED}) | HELD_BY_WORKER)
            new = msgspec.structs.replace(old, status=JobStatus.CANCELLED, finished_at_ms=event.at_ms)
        case JobExpired():
            old = _require(job, event, frozenset({JobStatus.QUEUED}))
            new = msgspec.structs.replace(old, status=JobStatus.EXPIRED, finished_at_ms=event.at_ms)
        case JobWebhookDelivered() | JobWebhookFailed() | JobWebhookRedeliveryRequested():
            # Facts about telling the user, after the job ended: they change nothing of the job itself.
            new = msgspec.structs.replace(_require(job, event, TERMINAL))
    new.seq = seq
    return new


def fold(events: Iterable[tuple[JobEvent, int]]) -> Job | None:
    """Replay `(event, seq)` pairs from the start of a job's subject."""
    job: Job | None = None
    for event, seq in events:
        job = apply(job, event, seq)
    return job


def visible_to(job: Job, owner: str | None) -> bool:
    """An operator (owner None) sees every job; a client (its API key id) only its own."""
    return owner is None or job.owner == owner


def decide_cancel(job: Job | None, req: CancelJob, owner: str | None) -> JobEvent | None:
    """A queued job is cancelled at once; a job a worker holds is asked to stop (the scheduler tells the
    worker); asking twice decides nothing (None); a finished job is refused. Another owner's job is not
    found, so a client cannot learn that it exists."""
    if job is None or not visible_to(job, owner):
        raise JobNotFound(f"job {req.id} not found")
    if job.status is JobStatus.QUEUED:
        return JobCancelled(job_id=job.id, reason=req.reason or "cancelled by request")
    if job.status in HELD_BY_WORKER:
        return None if job.cancel_requested else JobCancelRequested(job_id=job.id, reason=req.reason)
    raise InvalidTransition(f"job {job.id} is already {job.status.value}", {"status": job.status.value})


def decide_report(job: Job | None, worker_id: str, report: JobReport) -> JobEvent:
    """The event a worker's report about a job stands for; `StaleAttempt` when the report is not about
    the attempt this worker holds now (whatever the job's status), `apply` refuses the rest."""
    if job is None:
        raise JobNotFound(f"job {report.job_id} not found")
    _require_attempt(job, report.attempt, worker_id)
    common = {"job_id": job.id, "worker_id": worker_id, "attempt": report.attempt}
    match report:
        case ReportStarted():
            return JobStarted(**common)
        case ReportProgress():
            return JobProgress(**common, progress=report.progress, message=report.message)
        case ReportCompleted():
            return JobCompleted(**common, result=report.result)
        case ReportFailed():
            return JobFailed(**common, error=report.error)
        case ReportCancelled():
            if not job.cancel_requested:
                raise InvalidTransition(f"job {job.id} was not asked to cancel")
            return JobCancelled(job_id=job.id, reason="stopped by its worker")
    raise BadRequest(f"unknown report {type(report).__name__}")


def decide_reports(job: Job | None, worker_id: str, report: JobReport) -> tuple[JobEvent, ...]:
    """The events a worker's report stands for, in the order they are appended: its own (`decide_report`),
    after a `JobStarted` when it is an ending that carries its attempt's start (`with_start`) and the attempt
    is not started yet. The start is decided as a report of its own (same attempt checks), so a stale
    attempt is refused whole; a start already in the log (an earlier try got that far) is not repeated."""
    if isinstance(report, OutcomeReport) and report.with_start and job is not None and job.status is JobStatus.ASSIGNED:
        started = decide_report(job, worker_id, ReportStarted(job_id=report.job_id, attempt=report.attempt))
        return started, decide_report(apply(job, started), worker_id, report)
    return (decide_report(job, worker_id, report),)
