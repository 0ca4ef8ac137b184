"""The core's decisions, as tables: every (status, event) pair gives the new status or the typed refusal.

Pure functions, no NATS: `sdk.jobs.apply` for jobs, `sdk.workers.apply_worker` for workers, and the
gateway's decisions on requests (`decide_cancel`, `decide_report`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from sdk import api
from sdk import events as ev
from sdk.errors import InvalidTransition, JobNotFound, PlatformError, StaleAttempt
from sdk.jobs import Job, JobStatus, apply, decide_cancel, decide_report, decide_reports, visible_to
from sdk.workers import WorkerState, WorkerStatus, apply_worker

# --- Jobs --------------------------------------------------------------------------------------------

J, W = "j1", "w1"
ERROR = ev.ErrorInfo(code="boom", message="it broke")

#: The events that bring a new job to each status (attempt 1, on worker w1).
REACH: dict[JobStatus, list[ev.JobEvent]] = {
    JobStatus.QUEUED: [],
    JobStatus.ASSIGNED: [ev.JobAssigned(job_id=J, worker_id=W, region="eu", attempt=1)],
    JobStatus.RUNNING: [
        ev.JobAssigned(job_id=J, worker_id=W, region="eu", attempt=1),
        ev.JobStarted(job_id=J, worker_id=W, attempt=1),
    ],
    JobStatus.COMPLETED: [
        ev.JobAssigned(job_id=J, worker_id=W, region="eu", attempt=1),
        ev.JobCompleted(job_id=J, worker_id=W, attempt=1, result="ok"),
    ],
    JobStatus.FAILED: [ev.JobFailed(job_id=J, worker_id=None, attempt=1, error=ERROR)],
    JobStatus.CANCELLED: [ev.JobCancelled(job_id=J)],
    JobStatus.EXPIRED: [ev.JobExpired(job_id=J)],
}


def job_in(status: JobStatus | None) -> Job | None:
    if status is None:
        return None
    job = apply(None, ev.JobSubmitted(job_id=J, job_type="echo"), seq=1)
    for seq, event in enumerate(REACH[status], start=2):
        job = apply(job, event, seq)
    assert job.status is status
    return job


#: One event of each kind, about attempt 1 on worker w1 (a requeue moves to attempt 2).
JOB_EVENTS: dict[str, ev.JobEvent] = {
    "submitted": ev.JobSubmitted(job_id=J, job_type="echo"),
    "assigned": ev.JobAssigned(job_id=J, worker_id=W, region="eu", attempt=1),
    "started": ev.JobStarted(job_id=J, worker_id=W, attempt=1),
    "progress": ev.JobProgress(job_id=J, worker_id=W, attempt=1, progress=0.5),
    "completed": ev.JobCompleted(job_id=J, worker_id=W, attempt=1, result="ok"),
    "failed_by_worker": ev.JobFailed(job_id=J, worker_id=W, attempt=1, error=ERROR),
    "failed_by_platform": ev.JobFailed(job_id=J, worker_id=None, attempt=1, error=ERROR),
    "requeued": ev.JobRequeued(job_id=J, attempt=2, reason="worker_lost"),
    "cancel_requested": ev.JobCancelRequested(job_id=J),
    "cancelled": ev.JobCancelled(job_id=J),
    "expired": ev.JobExpired(job_id=J),
    "webhook_delivered": ev.JobWebhookDelivered(job_id=J, url="https://x.example/h", attempt=1, status_code=200, duration_ms=3.0),
    "webhook_failed": ev.JobWebhookFailed(job_id=J, url="https://x.example/h", attempt=1, reason="answered 500"),
    "webhook_redelivery_requested": ev.JobWebhookRedeliveryRequested(job_id=J),
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
    # Webhook deliveries are recorded on a finished job and change nothing of it.
    **{
        f"webhook_{kind}": {s: s for s in JobStatus if s.terminal}
        for kind in ("delivered", "failed", "redelivery_requested")
    },
}
JOB_STATUSES: list[JobStatus | None] = [None, *JobStatus]


def check_transition(fold: Callable[[Any, Any, int], Any], state: Any, event: Any, after: Any) -> None:
    """`fold(state, event)` gives a new struct with status `after`, leaving `state` untouched; or, when
    `after` is None, refuses with `InvalidTransition`."""
    if after is None:
        with pytest.raises(InvalidTransition):
            fold(state, event, 99)
        return
    before_copy = state and msgspec.structs.replace(state)
    new = fold(state, event, 99)
    assert (new.status, new.seq) == (after, 99)
    assert state == before_copy, "the fold changed the state it was given"


@pytest.mark.parametrize("before", JOB_STATUSES, ids=lambda s: getattr(s, "value", "none"))
@pytest.mark.parametrize("name", JOB_EVENTS)
def test_job_transition_table(name: str, before: JobStatus | None) -> None:
    check_transition(apply, job_in(before), JOB_EVENTS[name], JOB_TRANSITIONS[name].get(before))


def test_job_requeue_starts_the_next_attempt_afresh() -> None:
    new = apply(job_in(JobStatus.RUNNING), JOB_EVENTS["requeued"], seq=9)

    assert (new.attempt, new.worker_id, new.assigned_at_ms, new.started_at_ms) == (2, None, None, None)
    assert new.progress is None


def test_job_cancel_request_marks_the_job_and_keeps_its_status() -> None:
    new = apply(job_in(JobStatus.RUNNING), JOB_EVENTS["cancel_requested"], seq=9)

    assert (new.status, new.cancel_requested) == (JobStatus.RUNNING, True)


@pytest.mark.parametrize(
    ("before", "event"),
    [
        (JobStatus.QUEUED, ev.JobAssigned(job_id=J, worker_id=W, region="eu", attempt=2)),
        (JobStatus.ASSIGNED, ev.JobStarted(job_id=J, worker_id="w2", attempt=1)),
        (JobStatus.ASSIGNED, ev.JobStarted(job_id=J, worker_id=W, attempt=2)),
        (JobStatus.RUNNING, ev.JobProgress(job_id=J, worker_id="w2", attempt=1, progress=0.1)),
        (JobStatus.RUNNING, ev.JobCompleted(job_id=J, worker_id=W, attempt=0)),
        (JobStatus.RUNNING, ev.JobFailed(job_id=J, worker_id="w2", attempt=1, error=ERROR)),
        (JobStatus.RUNNING, ev.JobRequeued(job_id=J, attempt=3, reason="worker_lost")),
    ],
    ids=lambda v: getattr(v, "value", type(v).__name__),
)
def test_job_event_about_another_attempt_or_worker_is_stale(before: JobStatus, event: ev.JobEvent) -> None:
    with pytest.raises(StaleAttempt):
        apply(job_in(before), event)


# --- Decisions on requests ---------------------------------------------------------------------------

CANCEL = api.CancelJob(id=J, reason="changed my mind")


def test_cancel_of_a_queued_job_cancels_it_at_once() -> None:
    event = decide_cancel(job_in(JobStatus.QUEUED), CANCEL, owner=None)

    assert event == ev.JobCancelled(job_id=J, reason="changed my mind", at_ms=event.at_ms)
    assert decide_cancel(job_in(JobStatus.QUEUED), api.CancelJob(id=J), None).reason == "cancelled by request"


@pytest.mark.parametrize("status", [JobStatus.ASSIGNED, JobStatus.RUNNING])
def test_cancel_of_a_held_job_asks_its_worker_once(status: JobStatus) -> None:
    job = job_in(status)
    event = decide_cancel(job, CANCEL, owner=None)

    assert event == ev.JobCancelRequested(job_id=J, reason="changed my mind", at_ms=event.at_ms)
    assert decide_cancel(apply(job, event, seq=9), CANCEL, owner=None) is None


@pytest.mark.parametrize("status", [s for s in JobStatus if s.terminal])
def test_cancel_of_a_finished_job_is_refused_with_its_status(status: JobStatus) -> None:
    with pytest.raises(InvalidTransition) as refused:
        decide_cancel(job_in(status), CANCEL, owner=None)

    assert refused.value.details == {"status": status.value}


def test_a_client_sees_and_cancels_only_its_own_jobs() -> None:
    mine = apply(None, ev.JobSubmitted(job_id=J, job_type="echo", owner="key-a"), seq=1)

    assert (visible_to(mine, "key-a"), visible_to(mine, "key-b"), visible_to(mine, None)) == (True, False, True)
    assert isinstance(decide_cancel(mine, CANCEL, owner="key-a"), ev.JobCancelled)
    for job, owner in [(mine, "key-b"), (None, None)]:
        with pytest.raises(JobNotFound, match="job j1 not found"):
            decide_cancel(job, CANCEL, owner=owner)


#: report kind -> (the status the job is in, the report, the event it stands for)
REPORTS: dict[str, tuple[JobStatus, api.JobReport, type[ev.Event]]] = {
    "started": (JobStatus.ASSIGNED, api.ReportStarted(job_id=J, attempt=1), ev.JobStarted),
    "progress": (JobStatus.RUNNING, api.ReportProgress(job_id=J, attempt=1, progress=0.5), ev.JobProgress),
    "completed": (JobStatus.RUNNING, api.ReportCompleted(job_id=J, attempt=1, result="ok"), ev.JobCompleted),
    "failed": (JobStatus.RUNNING, api.ReportFailed(job_id=J, attempt=1, error=ERROR), ev.JobFailed),
}


@pytest.mark.parametrize("kind", REPORTS)
def test_a_report_about_the_current_attempt_becomes_its_event(kind: str) -> None:
    status, report, event_type = REPORTS[kind]
    job = job_in(status)

    event = decide_report(job, W, report)

    assert type(event) is event_type
    assert (event.job_id, event.worker_id, event.attempt) == (J, W, 1)
    apply(job, event)  # and the fold takes it


@pytest.mark.parametrize("kind", REPORTS)
@pytest.mark.parametrize(("worker_id", "attempt"), [("w2", 1), (W, 2)])
def test_a_report_from_another_worker_or_attempt_is_stale_whatever_the_status(
    kind: str, worker_id: str, attempt: int
) -> None:
    status, report, _ = REPORTS[kind]
    for job in (job_in(status), job_in(JobStatus.COMPLETED)):
        with pytest.raises(StaleAttempt):
            decide_report(job, worker_id, msgspec.structs.replace(report, attempt=attempt))


def test_a_worker_stops_a_job_only_when_asked() -> None:
    running = job_in(JobStatus.RUNNING)
    asked = apply(running, ev.JobCancelRequested(job_id=J), seq=9)

    with pytest.raises(InvalidTransition, match="was not asked to cancel"):
        decide_report(running, W, api.ReportCancelled(job_id=J, attempt=1))
    event = decide_report(asked, W, api.ReportCancelled(job_id=J, attempt=1))
    assert (type(event), event.reason) == (ev.JobCancelled, "stopped by its worker")


def test_a_report_about_an_unknown_job_is_not_found() -> None:
    with pytest.raises(JobNotFound):
        decide_report(None, W, api.ReportStarted(job_id=J, attempt=1))


#: Endings that carry their start (a job that ended before its start was reported).
WITH_START: dict[str, tuple[api.OutcomeReport, type[ev.Event]]] = {
    "completed": (api.ReportCompleted(job_id=J, attempt=1, result="ok", with_start=True), ev.JobCompleted),
    "failed": (api.ReportFailed(job_id=J, attempt=1, error=ERROR, with_start=True), ev.JobFailed),
}


@pytest.mark.parametrize("kind", WITH_START)
def test_an_ending_with_its_start_stands_for_started_then_the_ending(kind: str) -> None:
    report, ending = WITH_START[kind]
    job = job_in(JobStatus.ASSIGNED)

    events = decide_reports(job, W, report)

    assert [type(event) for event in events] == [ev.JobStarted, ending]
    assert all((event.job_id, event.worker_id, event.attempt) == (J, W, 1) for event in events)
    assert apply(apply(job, events[0]), events[1]).status is JobStatus(kind)


def test_an_ending_with_its_start_after_the_start_is_in_the_log_is_the_ending_alone() -> None:
    # An earlier try of the same request got as far as the start: it is not appended twice.
    report, _ = WITH_START["completed"]
    assert [type(event) for event in decide_reports(job_in(JobStatus.RUNNING), W, report)] == [ev.JobCompleted]


def test_a_cancelled_ending_with_its_start_needs_a_cancel_request() -> None:
    report = api.ReportCancelled(job_id=J, attempt=1, with_start=True)
    assigned = job_in(JobStatus.ASSIGNED)
    with pytest.raises(InvalidTransition, match="was not asked to cancel"):
        decide_reports(assigned, W, report)
    asked = apply(assigned, ev.JobCancelRequested(job_id=J), seq=9)
    assert [type(event) for event in decide_reports(asked, W, report)] == [ev.JobStarted, ev.JobCancelled]


@pytest.mark.parametrize(("worker_id", "attempt"), [("w2", 1), (W, 2)])
@pytest.mark.parametrize("status", [JobStatus.ASSIGNED, JobStatus.RUNNING, JobStatus.COMPLETED])
def test_an_ending_with_its_start_from_another_worker_or_attempt_is_stale_whole(
    status: JobStatus, worker_id: str, attempt: int
) -> None:
    report, _ = WITH_START["completed"]
    with pytest.raises(StaleAttempt):
        decide_reports(job_in(status), worker_id, msgspec.structs.replace(report, attempt=attempt))


def test_an_ending_with_its_start_of_a_finished_attempt_is_refused() -> None:
    # A repeat after the first try landed whole: no second start, and the fold refuses a second ending.
    report, _ = WITH_START["completed"]
    done = job_in(JobStatus.COMPLETED)
    events = decide_reports(done, W, report)
    assert [type(event) for event in events] == [ev.JobCompleted]
    with pytest.raises(InvalidTransition):
        apply(done, events[0])


@pytest.mark.parametrize("kind", REPORTS)
def test_any_other_report_stands_for_its_one_event(kind: str) -> None:
    status, report, event_type = REPORTS[kind]
    assert [type(event) for event in decide_reports(job_in(status), W, report)] == [event_type]


# --- Workers -----------------------------------------------------------------------------------------

REGISTERED = ev.WorkerRegistered(worker_id=W, name="w1", region="eu", capabilities=("echo", "llm"))
WORKER_REACH: dict[WorkerStatus, list[ev.WorkerEvent]] = {
    WorkerStatus.ONLINE: [],
    WorkerStatus.DRAINING: [ev.WorkerDraining(worker_id=W)],
    WorkerStatus.LOST: [ev.WorkerLost(worker_id=W, reason="silent")],
    WorkerStatus.DEREGISTERED: [ev.WorkerDeregistered(worker_id=W)],
}


def worker_in(status: WorkerStatus | None) -> WorkerState | None:
    if status is None:
        return None
    worker = apply_worker(None, REGISTERED, seq=1)
    worker = apply_worker(worker, ev.WorkerModelLoaded(worker_id=W, model="m1", memory_bytes=10), seq=2)
    for seq, event in enumerate(WORKER_REACH[status], start=3):
        worker = apply_worker(worker, event, seq)
    assert worker.status is status
    return worker


WORKER_EVENTS: dict[str, ev.WorkerEvent] = {
    "registered": REGISTERED,
    "model_loaded": ev.WorkerModelLoaded(worker_id=W, model="m2", memory_bytes=20),
    "model_unloaded": ev.WorkerModelUnloaded(worker_id=W, model="m1"),
    "draining": ev.WorkerDraining(worker_id=W),
    "lost": ev.WorkerLost(worker_id=W, reason="silent"),
    "deregistered": ev.WorkerDeregistered(worker_id=W),
    "credentials_rotated": ev.WorkerCredentialsRotated(worker_id=W, generation=2),
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
    check_transition(apply_worker, worker_in(before), WORKER_EVENTS[name], WORKER_TRANSITIONS[name].get(before))


def test_worker_event_time_is_the_last_update() -> None:
    event = ev.WorkerDraining(worker_id=W, at_ms=1234)

    assert apply_worker(worker_in(WorkerStatus.ONLINE), event, seq=7).updated_at_ms == 1234


def test_worker_models_are_kept_newest_last_with_their_memory() -> None:
    worker = worker_in(WorkerStatus.ONLINE)
    for seq, event in enumerate(
        [
            ev.WorkerModelLoaded(worker_id=W, model="m2", memory_bytes=20),
            ev.WorkerModelLoaded(worker_id=W, model="m1", memory_bytes=11),  # loaded again: moves to the end
            ev.WorkerModelUnloaded(worker_id=W, model="m2"),
            ev.WorkerModelUnloaded(worker_id=W, model="never-loaded"),
        ],
        start=3,
    ):
        worker = apply_worker(worker, event, seq)

    assert worker.loaded_models == {"m1": 11}


def test_worker_registering_again_comes_back_online_with_its_new_description() -> None:
    again = ev.WorkerRegistered(worker_id=W, name="renamed", region="us", capabilities=("echo",))

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
