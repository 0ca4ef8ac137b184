"""The core's decisions, as tables: every (status, event) pair gives the new status or the typed refusal.

Pure functions, no NATS: `sdk.jobs.apply` for jobs, `sdk.workers.apply_worker` for workers.
"""

from __future__ import annotations

import msgspec
import pytest

from sdk.errors import InvalidTransition, PlatformError, StaleAttempt
from sdk.events import (
    ErrorInfo,
    JobAssigned,
    JobCancelled,
    JobCancelRequested,
    JobCompleted,
    JobEvent,
    JobExpired,
    JobFailed,
    JobProgress,
    JobRequeued,
    JobStarted,
    JobSubmitted,
    WorkerCredentialsRotated,
    WorkerDeregistered,
    WorkerDraining,
    WorkerEvent,
    WorkerLost,
    WorkerModelLoaded,
    WorkerModelUnloaded,
    WorkerRegistered,
)
from sdk.jobs import Job, JobStatus, apply
from sdk.workers import WorkerState, WorkerStatus, apply_worker

# --- Jobs --------------------------------------------------------------------------------------------

J, W = "j1", "w1"
ERROR = ErrorInfo(code="boom", message="it broke")

#: The events that bring a new job to each status (attempt 1, on worker w1).
REACH: dict[JobStatus, list[JobEvent]] = {
    JobStatus.QUEUED: [],
    JobStatus.ASSIGNED: [JobAssigned(job_id=J, worker_id=W, region="eu", attempt=1)],
    JobStatus.RUNNING: [JobAssigned(job_id=J, worker_id=W, region="eu", attempt=1), JobStarted(job_id=J, worker_id=W, attempt=1)],
    JobStatus.COMPLETED: [
        JobAssigned(job_id=J, worker_id=W, region="eu", attempt=1),
        JobCompleted(job_id=J, worker_id=W, attempt=1, result="ok"),
    ],
    JobStatus.FAILED: [JobFailed(job_id=J, worker_id=None, attempt=1, error=ERROR)],
    JobStatus.CANCELLED: [JobCancelled(job_id=J)],
    JobStatus.EXPIRED: [JobExpired(job_id=J)],
}


def job_in(status: JobStatus | None) -> Job | None:
    if status is None:
        return None
    job = apply(None, JobSubmitted(job_id=J, job_type="echo"), seq=1)
    for seq, event in enumerate(REACH[status], start=2):
        job = apply(job, event, seq)
    assert job.status is status
    return job


#: One event of each kind, about attempt 1 on worker w1 (a requeue moves to attempt 2).
JOB_EVENTS: dict[str, JobEvent] = {
    "submitted": JobSubmitted(job_id=J, job_type="echo"),
    "assigned": JobAssigned(job_id=J, worker_id=W, region="eu", attempt=1),
    "started": JobStarted(job_id=J, worker_id=W, attempt=1),
    "progress": JobProgress(job_id=J, worker_id=W, attempt=1, progress=0.5),
    "completed": JobCompleted(job_id=J, worker_id=W, attempt=1, result="ok"),
    "failed_by_worker": JobFailed(job_id=J, worker_id=W, attempt=1, error=ERROR),
    "failed_by_platform": JobFailed(job_id=J, worker_id=None, attempt=1, error=ERROR),
    "requeued": JobRequeued(job_id=J, attempt=2, reason="worker_lost"),
    "cancel_requested": JobCancelRequested(job_id=J),
    "cancelled": JobCancelled(job_id=J),
    "expired": JobExpired(job_id=J),
}

Q, A, R = JobStatus.QUEUED, JobStatus.ASSIGNED, JobStatus.RUNNING
#: event -> {status before: status after}; every pair not listed is refused with `InvalidTransition`.
JOB_TRANSITIONS: dict[str, dict[JobStatus | None, JobStatus]] = {
    "submitted": {None: Q},
    "assigned": {Q: A},
    "started": {A: R},
    "progress": {R: R},
    "completed": {A: JobStatus.COMPLETED, R: JobStatus.COMPLETED},
    "failed_by_worker": {A: JobStatus.FAILED, R: JobStatus.FAILED},
    "failed_by_platform": {Q: JobStatus.FAILED, A: JobStatus.FAILED, R: JobStatus.FAILED},
    "requeued": {A: Q, R: Q},
    "cancel_requested": {A: A, R: R},
    "cancelled": {Q: JobStatus.CANCELLED, A: JobStatus.CANCELLED, R: JobStatus.CANCELLED},
    "expired": {Q: JobStatus.EXPIRED},
}
JOB_STATUSES: list[JobStatus | None] = [None, *JobStatus]


@pytest.mark.parametrize("before", JOB_STATUSES, ids=lambda s: getattr(s, "value", "none"))
@pytest.mark.parametrize("name", JOB_EVENTS)
def test_job_transition_table(name: str, before: JobStatus | None) -> None:
    job, event = job_in(before), JOB_EVENTS[name]
    after = JOB_TRANSITIONS[name].get(before)
    if after is None:
        with pytest.raises(InvalidTransition):
            apply(job, event, seq=99)
        return
    before_copy = job and msgspec.structs.replace(job)
    new = apply(job, event, seq=99)
    assert (new.status, new.seq) == (after, 99)
    assert job == before_copy, "apply changed the job it was given"


def test_job_requeue_starts_the_next_attempt_afresh() -> None:
    new = apply(job_in(JobStatus.RUNNING), JOB_EVENTS["requeued"], seq=9)

    assert (new.attempt, new.worker_id, new.assigned_at_ms, new.started_at_ms, new.progress) == (2, None, None, None, None)


def test_job_cancel_request_marks_the_job_and_keeps_its_status() -> None:
    new = apply(job_in(JobStatus.RUNNING), JOB_EVENTS["cancel_requested"], seq=9)

    assert (new.status, new.cancel_requested) == (JobStatus.RUNNING, True)


@pytest.mark.parametrize(
    ("before", "event"),
    [
        (JobStatus.QUEUED, JobAssigned(job_id=J, worker_id=W, region="eu", attempt=2)),
        (JobStatus.ASSIGNED, JobStarted(job_id=J, worker_id="w2", attempt=1)),
        (JobStatus.ASSIGNED, JobStarted(job_id=J, worker_id=W, attempt=2)),
        (JobStatus.RUNNING, JobProgress(job_id=J, worker_id="w2", attempt=1, progress=0.1)),
        (JobStatus.RUNNING, JobCompleted(job_id=J, worker_id=W, attempt=0)),
        (JobStatus.RUNNING, JobFailed(job_id=J, worker_id="w2", attempt=1, error=ERROR)),
        (JobStatus.RUNNING, JobRequeued(job_id=J, attempt=3, reason="worker_lost")),
    ],
    ids=lambda v: getattr(v, "value", type(v).__name__),
)
def test_job_event_about_another_attempt_or_worker_is_stale(before: JobStatus, event: JobEvent) -> None:
    with pytest.raises(StaleAttempt):
        apply(job_in(before), event)


# --- Workers -----------------------------------------------------------------------------------------

REGISTERED = WorkerRegistered(worker_id=W, name="w1", region="eu", capabilities=("echo", "llm"))
WORKER_REACH: dict[WorkerStatus, list[WorkerEvent]] = {
    WorkerStatus.ONLINE: [],
    WorkerStatus.DRAINING: [WorkerDraining(worker_id=W)],
    WorkerStatus.LOST: [WorkerLost(worker_id=W, reason="silent")],
    WorkerStatus.DEREGISTERED: [WorkerDeregistered(worker_id=W)],
}


def worker_in(status: WorkerStatus | None) -> WorkerState | None:
    if status is None:
        return None
    worker = apply_worker(None, REGISTERED, seq=1)
    worker = apply_worker(worker, WorkerModelLoaded(worker_id=W, model="m1", memory_bytes=10), seq=2)
    for seq, event in enumerate(WORKER_REACH[status], start=3):
        worker = apply_worker(worker, event, seq)
    assert worker.status is status
    return worker


WORKER_EVENTS: dict[str, WorkerEvent] = {
    "registered": REGISTERED,
    "model_loaded": WorkerModelLoaded(worker_id=W, model="m2", memory_bytes=20),
    "model_unloaded": WorkerModelUnloaded(worker_id=W, model="m1"),
    "draining": WorkerDraining(worker_id=W),
    "lost": WorkerLost(worker_id=W, reason="silent"),
    "deregistered": WorkerDeregistered(worker_id=W),
    "credentials_rotated": WorkerCredentialsRotated(worker_id=W, generation=2),
}

ON, DR, LO, DE = WorkerStatus.ONLINE, WorkerStatus.DRAINING, WorkerStatus.LOST, WorkerStatus.DEREGISTERED
SAME = {ON: ON, DR: DR, LO: LO, DE: DE}
#: event -> {status before: status after}; every pair not listed is refused with `InvalidTransition`.
WORKER_TRANSITIONS: dict[str, dict[WorkerStatus | None, WorkerStatus]] = {
    "registered": {None: ON, ON: ON, DR: ON, LO: ON, DE: ON},
    "model_loaded": SAME,
    "model_unloaded": SAME,
    "draining": {ON: DR, DR: DR, LO: DR},
    "lost": {ON: LO, DR: LO, LO: LO},
    "deregistered": {ON: DE, DR: DE, LO: DE, DE: DE},
    "credentials_rotated": SAME,
}
WORKER_STATUSES: list[WorkerStatus | None] = [None, *WorkerStatus]


@pytest.mark.parametrize("before", WORKER_STATUSES, ids=lambda s: getattr(s, "value", "none"))
@pytest.mark.parametrize("name", WORKER_EVENTS)
def test_worker_transition_table(name: str, before: WorkerStatus | None) -> None:
    worker, event = worker_in(before), WORKER_EVENTS[name]
    after = WORKER_TRANSITIONS[name].get(before)
    if after is None:
        with pytest.raises(InvalidTransition):
            apply_worker(worker, event, seq=99)
        return
    before_copy = worker and msgspec.structs.replace(worker)
    new = apply_worker(worker, event, seq=99)
    assert (new.status, new.seq, new.updated_at_ms) == (after, 99, event.at_ms)
    assert worker == before_copy, "apply_worker changed the state it was given"


def test_worker_models_are_kept_newest_last_with_their_memory() -> None:
    worker = worker_in(WorkerStatus.ONLINE)
    for seq, event in enumerate(
        [
            WorkerModelLoaded(worker_id=W, model="m2", memory_bytes=20),
            WorkerModelLoaded(worker_id=W, model="m1", memory_bytes=11),  # loaded again: moves to the end
            WorkerModelUnloaded(worker_id=W, model="m2"),
            WorkerModelUnloaded(worker_id=W, model="never-loaded"),
        ],
        start=3,
    ):
        worker = apply_worker(worker, event, seq)

    assert worker.loaded_models == {"m1": 11}


def test_worker_registering_again_comes_back_online_with_its_new_description() -> None:
    again = WorkerRegistered(worker_id=W, name="renamed", region="us", capabilities=("echo",))

    new = apply_worker(worker_in(WorkerStatus.LOST), again, seq=9)

    assert (new.status, new.name, new.region, new.capabilities) == (WorkerStatus.ONLINE, "renamed", "us", ["echo"])
    assert new.loaded_models == {"m1": 10}, "a returning worker may still hold its models"


def test_worker_fold_keeps_the_callers_struct_type() -> None:
    class Row(WorkerState, kw_only=True):
        capacity: int = 1

    new = apply_worker(Row(id=W, capacity=4), REGISTERED, seq=1)

    assert isinstance(new, Row) and new.capacity == 4


def test_refusals_are_platform_errors_with_a_code() -> None:
    with pytest.raises(PlatformError) as refused:
        apply_worker(worker_in(WorkerStatus.DEREGISTERED), WORKER_EVENTS["lost"])

    assert refused.value.code == "invalid_transition"
