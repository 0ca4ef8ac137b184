"""What becomes of a job the platform must take back: its worker is gone, or it waited too long.

Pure decisions; the service appends the events they return at the job's expected sequence.
"""

from __future__ import annotations

from sdk.events import ErrorInfo, JobCancelled, JobFailed, JobRequeued
from sdk.jobs import Job, JobStatus


def recover(job: Job, *, reason: str) -> JobCancelled | JobRequeued | JobFailed:
    """The outcome of a job held by a worker that is gone (lost or deregistered)."""
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


def is_expired(job: Job, now_ms: int) -> bool:
    """A queued job that has waited longer than its `timeout_s` since submission."""
    return job.status is JobStatus.QUEUED and now_ms - job.submitted_at_ms > job.timeout_s * 1000
