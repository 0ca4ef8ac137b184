"""What becomes of a job the platform must take back: its worker is gone, its worker no longer holds it,
or it waited too long.

Pure decisions; the service appends the events they return at the job's expected sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from sdk.events import ErrorInfo, JobCancelled, JobFailed, JobRequeued
from sdk.jobs import Job, JobStatus

#: The reason on a job taken back because its worker's heartbeats leave it out.
NOT_HELD_BY_WORKER = "not_held_by_worker"
#: A job its worker leaves out of this many consecutive heartbeats is not there (the dispatch was lost or
#: dropped, or the worker restarted without it). Two, so one heartbeat taken at an unlucky instant is not
#: enough to run a job twice.
NOT_HELD_AFTER_HEARTBEATS = 2
#: Only heartbeats stored this long after the assignment count against a job: one taken earlier may
#: predate the dispatch's arrival at the worker. Both times come from the platform's clocks (the
#: scheduler's and the broker's), never from the worker's, which may be far off.
DISPATCH_TRANSIT_MARGIN_S = 2.0


class HeldReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one heartbeat says its worker holds (assigned or running, or waiting for a slot)."""

    #: When the broker stored the heartbeat.
    stored_at_ms: int
    job_ids: frozenset[str]


def recover(job: Job, *, reason: str) -> JobCancelled | JobRequeued | JobFailed:
    """The outcome of a job held by a worker that will not finish it (gone, or not holding it)."""
    if job.cancel_requested:
        # The user no longer wants it; running it again elsewhere would waste a GPU.
        return JobCancelled(job_id=job.id, reason=reason)
    if job.attempt < job.max_attempts:
        return JobRequeued(job_id=job.id, attempt=job.attempt + 1, reason=reason)
    return JobFailed(
        job_id=job.id,
        worker_id=None,
        attempt=job.attempt,
        error=ErrorInfo(
            code="max_attempts_exceeded",
            message=f"attempt {job.attempt} of {job.max_attempts} ended with {reason}; no attempts left",
            details={"reason": reason, "worker_id": job.worker_id, "max_attempts": job.max_attempts},
        ),
    )


def not_held(job: Job, reports: Sequence[HeldReport]) -> bool:
    """The worker's last `NOT_HELD_AFTER_HEARTBEATS` heartbeats (oldest first), all taken after the
    dispatch must have reached it, leave out the job it was assigned."""
    if job.assigned_at_ms is None:
        return False
    counted_after_ms = job.assigned_at_ms + DISPATCH_TRANSIT_MARGIN_S * 1000
    recent = reports[-NOT_HELD_AFTER_HEARTBEATS:]
    return len(recent) == NOT_HELD_AFTER_HEARTBEATS and all(
        report.stored_at_ms > counted_after_ms and job.id not in report.job_ids for report in recent
    )


def is_expired(job: Job, now_ms: int) -> bool:
    """A queued job that has waited longer than its `timeout_s` since submission."""
    return job.status is JobStatus.QUEUED and now_ms - job.submitted_at_ms > job.timeout_s * 1000
