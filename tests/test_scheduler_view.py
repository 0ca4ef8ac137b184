"""The scheduler's view of workers: the shared lifecycle fold plus what depends on delivery (pure, no NATS)."""

from __future__ import annotations

from typing import Any

from scheduler.view import SchedulerView
from sdk.events import (
    Heartbeat,
    JobAssigned,
    JobExpired,
    JobSubmitted,
    WorkerDeregistered,
    WorkerDraining,
    WorkerEvent,
    WorkerLost,
    WorkerModelLoaded,
    WorkerRegistered,
)

REGISTERED = WorkerRegistered(worker_id="w1", name="w1", region="eu", capabilities=("echo", "llm"))


def log(view: SchedulerView, *events: WorkerEvent, stored_at_ms: int = 1_000) -> None:
    for seq, event in enumerate(events, start=max((w.seq for w in view.workers.values()), default=0) + 1):
        view.apply_worker_event(event, seq, stored_at_ms * 1000, now_s=stored_at_ms / 1000)


def beat(view: SchedulerView, stored_at_ms: int, **fields: Any) -> None:
    heartbeat = Heartbeat(worker_id="w1", region="eu", **fields)
    view.apply_heartbeat(heartbeat, stored_at_us=stored_at_ms * 1000, now_s=stored_at_ms / 1000)


def test_a_worker_is_placed_on_once_registered_not_when_only_its_heartbeat_arrived() -> None:
    view = SchedulerView()
    beat(view, 500)
    log(view, WorkerModelLoaded(worker_id="w1", model="tiny-llm"))  # before the registration: ignored

    assert view.candidates() == {}

    log(view, REGISTERED)

    candidate = view.candidates()["w1"]
    assert (candidate.region, candidate.capabilities, candidate.alive, candidate.draining) == (
        "eu",
        ("echo", "llm"),
        True,
        False,
    )
    assert view.workers["w1"].seq == 2, "the subject's last sequence, for the next expected-sequence append"


def test_a_lost_worker_comes_back_with_a_heartbeat_stored_after_the_loss() -> None:
    view = SchedulerView()
    log(view, REGISTERED, stored_at_ms=1_000)
    beat(view, 2_000)
    log(view, WorkerLost(worker_id="w1", reason="silent"), stored_at_ms=3_000)
    assert not view.candidates()["w1"].alive

    beat(view, 2_500)  # sent before the loss: not a sign of life
    assert not view.candidates()["w1"].alive

    beat(view, 3_500)
    assert view.candidates()["w1"].alive


def test_draining_holds_until_the_worker_registers_again() -> None:
    view = SchedulerView()
    log(view, REGISTERED, WorkerDraining(worker_id="w1"))
    beat(view, 2_000)  # a heartbeat that does not say draining does not undo the event
    assert view.candidates()["w1"].draining

    log(view, REGISTERED)
    assert not view.candidates()["w1"].draining


def test_a_deregistered_worker_stays_gone_whatever_comes_after() -> None:
    view = SchedulerView()
    log(view, REGISTERED, WorkerDeregistered(worker_id="w1"), WorkerLost(worker_id="w1", reason="late"))
    worker = view.workers["w1"]

    assert (worker.gone, worker.deregistered, worker.alive) == (True, True, False)
    assert worker.seq == 3


def test_loaded_models_are_the_heartbeats_amended_by_later_load_events() -> None:
    view = SchedulerView()
    log(view, REGISTERED, WorkerModelLoaded(worker_id="w1", model="old"))
    beat(view, 2_000, loaded_models=("tiny-sd",))
    log(view, WorkerModelLoaded(worker_id="w1", model="tiny-llm"))

    assert view.candidates()["w1"].loaded_models == ("tiny-llm", "tiny-sd")


def test_a_broker_outage_does_not_count_as_the_workers_silence() -> None:
    view = SchedulerView()
    log(view, REGISTERED, stored_at_ms=1_000)
    beat(view, 2_000, interval_s=0.5)
    assert [w.worker_id for w, _ in view.overdue_workers(now_s=4.0)] == ["w1"], "silent for four intervals"

    view.excuse_silence(until_s=8.0)  # the broker came back; the worker reconnects after the scheduler

    assert view.overdue_workers(now_s=9.0) == []
    assert [w.worker_id for w, _ in view.overdue_workers(now_s=9.6)] == ["w1"], "three intervals after the grace"
    beat(view, 9_700, interval_s=0.5)
    assert view.overdue_workers(now_s=10.0) == []


def test_a_queued_job_expires_once_past_its_timeout_until_it_leaves_the_queue() -> None:
    view = SchedulerView()
    waiting = JobSubmitted(job_id="j1", job_type="echo", timeout_s=10.0, at_ms=1_000)
    placed = JobSubmitted(job_id="j2", job_type="echo", timeout_s=10.0, at_ms=1_000)
    for seq, event in enumerate([waiting, placed, JobAssigned(job_id="j2", worker_id="w1", region="eu", attempt=1)], 1):
        view.apply_job_event(event, seq)

    assert view.expired_jobs(now_ms=11_000) == []  # not past it yet
    assert [job.id for job in view.expired_jobs(now_ms=11_001)] == ["j1"]  # the assigned one never
    # Its JobExpired did not land: the next sweep offers it again, and once it lands, never again.
    assert [job.id for job in view.expired_jobs(now_ms=11_300)] == ["j1"]
    view.apply_job_event(JobExpired(job_id="j1"), 4)
    assert view.expired_jobs(now_ms=12_000) == []
