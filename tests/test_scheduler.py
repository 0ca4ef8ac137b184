"""The scheduler against a real nats-server: placement, dispatch, leadership, loss, jobs a worker does not
hold, and expiry; at the end, the pure decision about jobs a living worker does not hold.

Workers are simulated the way the platform sees them: a `WorkerRegistered` event on `workers.<id>` and
heartbeats on `heartbeats.<region>.<id>` that list the jobs dispatched to the worker. Outcomes are read
back from the JOBS, WORKERS and DISPATCH streams. Each test has a server of its own, so no job or lease of
another test can interfere.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from scheduler.recovery import DISPATCH_TRANSIT_MARGIN_S, NOT_HELD_BY_WORKER, HeldReport, not_held, recover
from scheduler.service import Scheduler
from scheduler.view import SchedulerView
from sdk import events as ev
from sdk import subjects
from sdk.broker import EmbeddedNats
from sdk.connection import connect
from sdk.jobs import Job, JobStatus
from sdk.log import append, ensure_streams, read_job_events, read_subject
from tests.conftest import wait_until

T = TypeVar("T")
HEARTBEAT_INTERVAL_S = 0.3
#: How long the scheduler may take to act on what a test did, unless the test says otherwise.
WITHIN_S = 5.0


# --- fixtures: a server, a client, schedulers and simulated workers -----------------------------


@pytest.fixture
async def js(fresh_nats: EmbeddedNats) -> AsyncIterator[JetStreamContext]:
    nc = await connect(fresh_nats.url, name="test-scheduler-client")
    await ensure_streams(nc.jetstream())
    yield nc.jetstream()
    await nc.close()


class Schedulers:
    """Starts schedulers, each on a connection of its own like a separate process; stops them all."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.running: list[tuple[Scheduler, NatsClient]] = []

    async def start(self, instance_id: str) -> Scheduler:
        nc = await connect(self.url, name=instance_id)
        scheduler = Scheduler(nc, instance_id=instance_id, tick_s=0.1)
        await scheduler.start()
        self.running.append((scheduler, nc))
        return scheduler

    async def crash(self, scheduler: Scheduler) -> None:
        """The process vanishes: its connection drops without releasing the lease."""
        nc = next(nc for s, nc in self.running if s is scheduler)
        await nc.close()

    async def stop_all(self) -> None:
        for scheduler, nc in self.running:
            await scheduler.stop()
            await nc.close()


@pytest.fixture
async def schedulers(fresh_nats: EmbeddedNats, js: JetStreamContext) -> AsyncIterator[Schedulers]:
    started = Schedulers(fresh_nats.url)
    yield started
    await started.stop_all()


@dataclass
class FakeWorker:
    """A worker as the scheduler sees it: a registration and a heartbeat every `interval_s` listing the jobs
    dispatched to it (as `in_flight`); with `keeps_dispatches=False` its dispatches never reach it."""

    js: JetStreamContext
    worker_id: str
    region: str
    capabilities: tuple[str, ...]
    keeps_dispatches: bool = field(default=True, kw_only=True)
    _beating: asyncio.Task[None] | None = field(default=None, init=False)
    #: Dispatches read so far with their stream sequence; the beat task and the test both read.
    _received: list[tuple[int, ev.Dispatch]] = field(default_factory=list, init=False)
    _next_seq: int = field(default=1, init=False)
    _reading: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    #: Dispatches before this sequence were lost with the process in a restart.
    _held_from_seq: int = field(default=1, init=False)

    async def register(self) -> None:
        event = ev.WorkerRegistered(
            worker_id=self.worker_id, name=self.worker_id, region=self.region, capabilities=self.capabilities
        )
        await append(self.js, subjects.worker_subject(self.worker_id), event)

    async def beat(self) -> None:
        heartbeat = ev.Heartbeat(
            worker_id=self.worker_id, region=self.region, interval_s=HEARTBEAT_INTERVAL_S, in_flight=await self.held()
        )
        await self.js.publish(subjects.heartbeat_subject(self.region, self.worker_id), ev.encoder.encode(heartbeat))

    async def _beat_forever(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def start_beating(self) -> None:
        await self.beat()
        self._beating = asyncio.create_task(self._beat_forever())

    async def stop_beating(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beating
            self._beating = None

    async def restart(self) -> None:
        """Come back at once without the jobs dispatched so far, as a killed process that is restarted
        within a heartbeat (its unacked dispatches come back only after the ack wait, a minute later)."""
        await self.dispatches()
        self._held_from_seq = self._next_seq

    async def held(self) -> tuple[str, ...]:
        """Ids of the jobs whose assignment reached this worker (since its last restart)."""
        await self.dispatches()
        if not self.keeps_dispatches:
            return ()
        held = (d.job_id for seq, d in self._received if seq >= self._held_from_seq and isinstance(d, ev.Assignment))
        return tuple(dict.fromkeys(held))

    async def dispatches(self) -> list[ev.Dispatch]:
        """Everything sent to this worker's dispatch subject, oldest first."""
        subject = subjects.dispatch_subject(self.region, self.worker_id)
        async with self._reading:
            while True:
                try:
                    msg = await self.js.get_msg(subjects.DISPATCH_STREAM, seq=self._next_seq, subject=subject, next=True)
                except NotFoundError:
                    break
                self._received.append((msg.seq, ev.dispatch_decoder.decode(msg.data or b"")))
                self._next_seq = msg.seq + 1
        return [dispatch for _, dispatch in self._received]


@pytest.fixture
async def workers(js: JetStreamContext) -> AsyncIterator[Callable[..., Awaitable[FakeWorker]]]:
    started: list[FakeWorker] = []

    async def online(
        worker_id: str,
        region: str = "eu",
        capabilities: tuple[str, ...] = ("echo",),
        *,
        keeps_dispatches: bool = True,
        **config: Any,
    ) -> FakeWorker:
        """Register a worker (with runtime config overrides, if any) and keep it heartbeating."""
        if config:
            kv = await js.key_value(subjects.WORKER_CONFIG_BUCKET)
            await kv.put(worker_id, msgspec.json.encode(config))
        worker = FakeWorker(js, worker_id, region, capabilities, keeps_dispatches=keeps_dispatches)
        started.append(worker)
        await worker.register()
        await worker.start_beating()
        return worker

    yield online
    for worker in started:
        await worker.stop_beating()


# --- reading outcomes ------------------------------------------------------------------------------


async def submit(js: JetStreamContext, **fields: Any) -> str:
    job_id = uuid.uuid4().hex[:12]
    submitted = ev.JobSubmitted(job_id=job_id, job_type="echo", **fields)
    await append(js, subjects.job_subject(job_id), submitted, expected_seq=0)
    return job_id


async def append_next(js: JetStreamContext, event: ev.JobEvent) -> None:
    """Append `event` right after its job's last event, with the sequence check the services use."""
    seq = (await read_job_events(js, event.job_id))[-1][1]
    await append(js, subjects.job_subject(event.job_id), event, expected_seq=seq)


async def events(js: JetStreamContext, job_id: str) -> list[ev.JobEvent]:
    return [event for event, _ in await read_job_events(js, job_id)]


def kinds(history: list[ev.JobEvent]) -> list[str]:
    return [type(event).__name__ for event in history]


async def until_event(js: JetStreamContext, job_id: str, kind: type[T], *, timeout_s: float = WITHIN_S) -> T:
    """The job's first event of `kind` after it appears; with the job's whole history in the failure."""

    async def find() -> T | None:
        return next((e for e in reversed(await events(js, job_id)) if isinstance(e, kind)), None)

    return await wait_until(find, timeout_s, f"{kind.__name__} on job {job_id}")


async def leader_among(*candidates: Scheduler, timeout_s: float = WITHIN_S) -> Scheduler:
    async def the_one() -> Scheduler | None:
        leaders = [s for s in candidates if s.is_leader]
        assert len(leaders) <= 1, "two schedulers lead at once"
        return leaders[0] if leaders else None

    return await wait_until(the_one, timeout_s, "a leader")


async def leader_and_standby(schedulers: Schedulers) -> tuple[Scheduler, Scheduler]:
    """Two schedulers started at once, once one of them leads: (the leader, the standby)."""
    first, second = await asyncio.gather(schedulers.start("s1"), schedulers.start("s2"))
    leader = await leader_among(first, second)
    return leader, second if leader is first else first


async def job_assigned_to_w1(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]], **fields: Any
) -> tuple[FakeWorker, ev.JobAssigned]:
    """The start of a story about a running job: a leading scheduler, worker w1 online in `eu`, and one
    job (submitted with `fields`) assigned to it."""
    await leader_among(await schedulers.start("s1"))
    worker = await workers("w1")
    return worker, await until_event(js, await submit(js, **fields), ev.JobAssigned)


# --- the stories -------------------------------------------------------------------------------------


async def test_submitted_job_is_assigned_once_and_dispatched_to_its_worker(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    scheduler = await schedulers.start("s1")
    await leader_among(scheduler)
    near, _far = await workers("w-eu", "eu"), await workers("w-us", "us")

    job_id = await submit(js, region="eu", params={"text": "hi"}, timeout_s=60.0)

    assigned = await until_event(js, job_id, ev.JobAssigned)
    assert (assigned.worker_id, assigned.region, assigned.attempt) == ("w-eu", "eu", 1)
    sent = await wait_until(near.dispatches, WITHIN_S, "the dispatch")
    assert sent == [
        ev.Assignment(job_id=job_id, attempt=1, job_type="echo", model=None, params={"text": "hi"}, timeout_s=60.0)
    ]
    # A later job, once assigned, proves the scheduler has moved on without touching the first again.
    await until_event(js, await submit(js, region="eu"), ev.JobAssigned)
    assert kinds(await events(js, job_id)) == ["JobSubmitted", "JobAssigned"]
    assert [d.job_id for d in await near.dispatches()].count(job_id) == 1


async def test_two_schedulers_elect_one_leader_and_never_assign_a_job_twice(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    first, second = await asyncio.gather(schedulers.start("s1"), schedulers.start("s2"))
    await leader_among(first, second)
    worker = await workers("w1", max_concurrency=100)

    job_ids = await asyncio.gather(*(submit(js) for _ in range(100)))

    async def all_assigned() -> bool:
        await leader_among(first, second)  # fails the test if both lead at any poll
        return len({d.job_id for d in await worker.dispatches()}) == 100

    await wait_until(all_assigned, 15.0, "100 jobs dispatched")
    for job_id in job_ids:
        assignments = [e for e in await events(js, job_id) if isinstance(e, ev.JobAssigned)]
        assert [(a.worker_id, a.attempt) for a in assignments] == [("w1", 1)], job_id
    assert len(await worker.dispatches()) == 100
    assert [first.is_leader, second.is_leader].count(True) == 1


async def test_standby_takes_over_when_the_leader_stops(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    leader, standby = await leader_and_standby(schedulers)
    worker = await workers("w1")

    started_s = time.monotonic()
    await leader.stop()

    assert await leader_among(standby, timeout_s=3.0) is standby
    assert time.monotonic() - started_s < 3.0
    job_id = await submit(js)
    assert (await until_event(js, job_id, ev.JobAssigned)).worker_id == "w1"
    assert [d.job_id for d in await wait_until(worker.dispatches, WITHIN_S, "the dispatch")] == [job_id]


async def test_standby_takes_over_when_the_leader_crashes(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    leader, standby = await leader_and_standby(schedulers)
    await workers("w1")

    await schedulers.crash(leader)

    # The dead leader's key lives until the lease TTL (5 s), then the standby's next try wins.
    assert await leader_among(standby, timeout_s=8.0) is standby
    assert not leader.is_leader  # its renewals failed, so it stepped down
    assert (await until_event(js, await submit(js), ev.JobAssigned)).worker_id == "w1"


async def test_new_leader_sends_an_assignment_the_old_leader_appended_but_never_dispatched(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    worker = await workers("w1")
    job_id = await submit(js)
    # The old leader's last act: the assignment is in the log, the dispatch never left.
    assigned = ev.JobAssigned(job_id=job_id, worker_id="w1", region="eu", attempt=1)
    await append(js, subjects.job_subject(job_id), assigned, expected_seq=1)

    await leader_among(await schedulers.start("s1"))

    assert [d.job_id for d in await wait_until(worker.dispatches, WITHIN_S, "the re-sent dispatch")] == [job_id]
    assert kinds(await events(js, job_id)) == ["JobSubmitted", "JobAssigned"]


async def test_dispatches_that_found_no_stream_are_sent_again_once_the_scheduler_made_it_again(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    await leader_among(await schedulers.start("s1"))
    worker = await workers("w1", max_concurrency=20)
    # The broker lost DISPATCH (a memory stream) in a restart: the pass's dispatches find no stream.
    await js.delete_stream(subjects.DISPATCH_STREAM)

    job_ids = await asyncio.gather(*(submit(js) for _ in range(20)))

    async def all_dispatched() -> bool:
        return {d.job_id for d in await worker.dispatches()} == set(job_ids)

    await wait_until(all_dispatched, 10.0, "20 jobs dispatched after DISPATCH came back")
    assert sorted(d.job_id for d in await worker.dispatches()) == sorted(job_ids)  # each once
    for job_id in job_ids:
        assert kinds(await events(js, job_id)) == ["JobSubmitted", "JobAssigned"], job_id


async def test_leader_steps_down_at_once_when_it_loses_the_lease(js: JetStreamContext, schedulers: Schedulers) -> None:
    scheduler = await schedulers.start("s1")
    await leader_among(scheduler)

    kv = await js.key_value(subjects.SCHEDULER_LEASE_BUCKET)
    await kv.put(subjects.SCHEDULER_LEASE_KEY, b"intruder")

    async def stepped_down() -> bool:
        return not scheduler.is_leader

    await wait_until(stepped_down, 2.0, "the leader steps down")


async def test_job_requeued_when_worker_lost_and_failed_when_attempts_run_out(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    worker, assigned = await job_assigned_to_w1(js, schedulers, workers, max_attempts=2)
    job_id = assigned.job_id

    await worker.stop_beating()

    requeued = await until_event(js, job_id, ev.JobRequeued)
    assert (requeued.attempt, requeued.reason) == (2, "worker_lost")
    lost = await read_subject(js, subjects.WORKERS_STREAM, subjects.worker_subject("w1"))
    assert isinstance(ev.worker_event_decoder.decode(lost[-1][0]), ev.WorkerLost)
    assert kinds(await events(js, job_id)) == ["JobSubmitted", "JobAssigned", "JobRequeued"]

    # A heartbeat brings the worker back, and the job's second attempt goes to it.
    await worker.start_beating()

    async def second_attempt() -> bool:
        return [e.attempt for e in await events(js, job_id) if isinstance(e, ev.JobAssigned)] == [1, 2]

    await wait_until(second_attempt, WITHIN_S, "attempt 2 assigned")
    assert [d.attempt for d in await worker.dispatches() if isinstance(d, ev.Assignment)] == [1, 2]

    await worker.stop_beating()

    failed = await until_event(js, job_id, ev.JobFailed)
    assert (failed.worker_id, failed.attempt, failed.error.code) == (None, 2, "max_attempts_exceeded")
    assert kinds(await events(js, job_id)) == [
        "JobSubmitted", "JobAssigned", "JobRequeued", "JobAssigned", "JobFailed"
    ]


async def test_jobs_of_a_deregistered_worker_are_requeued(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    job_id = (await job_assigned_to_w1(js, schedulers, workers))[1].job_id

    await append(js, subjects.worker_subject("w1"), ev.WorkerDeregistered(worker_id="w1", reason="shutdown"))

    requeued = await until_event(js, job_id, ev.JobRequeued)
    assert (requeued.attempt, requeued.reason) == (2, "worker_deregistered")


async def test_job_a_living_worker_never_received_is_requeued_then_failed_when_attempts_run_out(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    await leader_among(await schedulers.start("s1"))
    await workers("w-drop", "eu", keeps_dispatches=False)  # heartbeats on, but its dispatches go missing
    await workers("w-keep", "us")
    dropped = await submit(js, region="eu", max_attempts=2)
    kept = await submit(js, region="us")

    first = await until_event(js, dropped, ev.JobAssigned)
    requeued = await until_event(js, dropped, ev.JobRequeued, timeout_s=10.0)
    assert (first.worker_id, requeued.attempt, requeued.reason) == ("w-drop", 2, NOT_HELD_BY_WORKER)
    # Heartbeats taken while the dispatch may still have been on its way do not count against it.
    assert requeued.at_ms - first.at_ms > DISPATCH_TRANSIT_MARGIN_S * 1000

    failed = await until_event(js, dropped, ev.JobFailed, timeout_s=10.0)
    assert (failed.worker_id, failed.attempt, failed.error.code) == (None, 2, "max_attempts_exceeded")
    assert failed.error.details == {"reason": NOT_HELD_BY_WORKER, "worker_id": "w-drop", "max_attempts": 2}
    history = await events(js, dropped)
    assert kinds(history) == ["JobSubmitted", "JobAssigned", "JobRequeued", "JobAssigned", "JobFailed"]
    assert [e.worker_id for e in history if isinstance(e, ev.JobAssigned)] == ["w-drop", "w-drop"]
    # The job its worker holds, assigned as long ago, stays where it is; and no worker was declared lost.
    assert kinds(await events(js, kept)) == ["JobSubmitted", "JobAssigned"]
    for worker_id in ("w-drop", "w-keep"):
        records = await read_subject(js, subjects.WORKERS_STREAM, subjects.worker_subject(worker_id))
        assert [type(ev.worker_event_decoder.decode(data)).__name__ for data, _ in records] == ["WorkerRegistered"]


async def test_running_job_of_a_worker_that_restarted_without_it_is_requeued_to_a_second_attempt(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    worker, assigned = await job_assigned_to_w1(js, schedulers, workers)
    job_id = assigned.job_id
    await append_next(js, ev.JobStarted(job_id=job_id, worker_id="w1", attempt=1))

    # Back within one heartbeat, so nothing says the worker was ever away: only its heartbeats tell.
    await worker.restart()

    requeued = await until_event(js, job_id, ev.JobRequeued, timeout_s=10.0)
    assert (requeued.attempt, requeued.reason) == (2, NOT_HELD_BY_WORKER)

    async def second_attempt() -> list[ev.JobAssigned]:
        assignments = [e for e in await events(js, job_id) if isinstance(e, ev.JobAssigned)]
        return assignments if len(assignments) == 2 else []

    assignments = await wait_until(second_attempt, WITHIN_S, "attempt 2 assigned")
    assert [(a.worker_id, a.attempt) for a in assignments] == [("w1", 1), ("w1", 2)]
    assert assigned.attempt == 1
    assert [d.attempt for d in await worker.dispatches() if isinstance(d, ev.Assignment)] == [1, 2]
    assert kinds(await events(js, job_id)) == [
        "JobSubmitted", "JobAssigned", "JobStarted", "JobRequeued", "JobAssigned"
    ]


async def test_queued_job_expires_after_its_timeout(js: JetStreamContext, schedulers: Schedulers) -> None:
    await leader_among(await schedulers.start("s1"))

    job_id = await submit(js, timeout_s=0.5)
    patient_id = await submit(js, timeout_s=600.0)

    await until_event(js, job_id, ev.JobExpired)
    assert kinds(await events(js, job_id)) == ["JobSubmitted", "JobExpired"]
    assert kinds(await events(js, patient_id)) == ["JobSubmitted"]


async def test_cancel_request_sends_a_cancel_order_and_a_lost_worker_cancels_the_job(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    worker, assigned = await job_assigned_to_w1(js, schedulers, workers)
    job_id = assigned.job_id

    await append_next(js, ev.JobCancelRequested(job_id=job_id))

    async def cancel_order() -> list[ev.Dispatch]:
        sent = await worker.dispatches()
        return sent if len(sent) == 2 else []

    assert (await wait_until(cancel_order, WITHIN_S, "a cancel order"))[1] == ev.CancelOrder(job_id=job_id, attempt=1)

    # The worker dies before it confirms: the job is cancelled, not run again.
    await worker.stop_beating()
    assert (await until_event(js, job_id, ev.JobCancelled)).reason == "worker_lost"
    assert kinds(await events(js, job_id)) == ["JobSubmitted", "JobAssigned", "JobCancelRequested", "JobCancelled"]


async def test_queued_job_waits_for_a_free_slot_and_higher_priority_goes_first(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    await leader_among(await schedulers.start("s1"))
    await workers("w1", max_concurrency=1)
    running = await submit(js)
    await until_event(js, running, ev.JobAssigned)

    low = await submit(js, priority=0)
    high = await submit(js, priority=5)
    await append_next(js, ev.JobStarted(job_id=running, worker_id="w1", attempt=1))
    completed = ev.JobCompleted(job_id=running, worker_id="w1", attempt=1, result="done")
    await append_next(js, completed)

    assigned = await until_event(js, high, ev.JobAssigned)
    assert assigned.at_ms >= completed.at_ms  # it waited for the slot
    assert kinds(await events(js, low)) == ["JobSubmitted"]  # the one slot went to the higher priority


async def test_config_change_makes_a_refusing_worker_take_queued_work(
    js: JetStreamContext, schedulers: Schedulers, workers: Callable[..., Awaitable[FakeWorker]]
) -> None:
    await leader_among(await schedulers.start("s1"))
    await workers("w1", load_control={"acceptance_rate": 0.0})
    job_id = await submit(js)
    kv = await js.key_value(subjects.WORKER_CONFIG_BUCKET)

    changed_at_ms = int(time.time() * 1000)
    await kv.put("w1", msgspec.json.encode({"load_control": {"acceptance_rate": 1.0}}))

    assert (await until_event(js, job_id, ev.JobAssigned)).at_ms >= changed_at_ms


# --- the pure decision: which jobs a living worker does not hold -------------------------------------

ASSIGNED_AT_MS = 1_000_000
AFTER_MS = ASSIGNED_AT_MS + int(DISPATCH_TRANSIT_MARGIN_S * 1000) + 1


def assigned_job(job_id: str = "j1", *, max_attempts: int = 3) -> Job:
    view = SchedulerView()
    view.apply_job_event(ev.JobSubmitted(job_id=job_id, job_type="echo", max_attempts=max_attempts), seq=1)
    assigned = ev.JobAssigned(job_id=job_id, worker_id="w1", region="eu", attempt=1, at_ms=ASSIGNED_AT_MS)
    job = view.apply_job_event(assigned, seq=2)
    assert job is not None
    return job


def report(stored_at_ms: int, *job_ids: str) -> HeldReport:
    return HeldReport(stored_at_ms=stored_at_ms, job_ids=frozenset(job_ids))


def test_job_left_out_of_two_heartbeats_after_the_margin_is_not_held() -> None:
    assert not_held(assigned_job(), [report(AFTER_MS, "other"), report(AFTER_MS + 300)])


def test_job_in_either_of_the_last_two_heartbeats_is_held() -> None:
    job = assigned_job()
    assert not not_held(job, [report(AFTER_MS), report(AFTER_MS + 300, "j1")])
    assert not not_held(job, [report(AFTER_MS, "j1"), report(AFTER_MS + 300)])  # one more beat decides


def test_one_heartbeat_without_the_job_is_not_enough() -> None:
    assert not not_held(assigned_job(), [report(AFTER_MS)])


def test_heartbeats_within_the_dispatch_margin_do_not_count() -> None:
    job = assigned_job()
    assert not not_held(job, [report(ASSIGNED_AT_MS - 500), report(AFTER_MS)])  # taken before the assignment
    assert not not_held(job, [report(ASSIGNED_AT_MS + 100), report(ASSIGNED_AT_MS + 400)])  # dispatch in transit


def view_with_worker_holding(job_id: str, *, max_attempts: int, cancel: bool = False) -> SchedulerView:
    view = SchedulerView()
    view.apply_worker_event(ev.WorkerRegistered(worker_id="w1", name="w1", region="eu"), 1, 1, now_s=0.0)
    view.apply_job_event(ev.JobSubmitted(job_id=job_id, job_type="echo", max_attempts=max_attempts), seq=1)
    view.apply_job_event(ev.JobAssigned(job_id=job_id, worker_id="w1", region="eu", attempt=1, at_ms=ASSIGNED_AT_MS), 2)
    view.apply_job_event(ev.JobStarted(job_id=job_id, worker_id="w1", attempt=1), seq=3)
    if cancel:
        view.apply_job_event(ev.JobCancelRequested(job_id=job_id), seq=4)
    return view


def beat(view: SchedulerView, stored_at_ms: int, *in_flight: str) -> None:
    heartbeat = ev.Heartbeat(worker_id="w1", region="eu", in_flight=in_flight)
    view.apply_heartbeat(heartbeat, stored_at_us=stored_at_ms * 1000, now_s=stored_at_ms / 1000)


def test_view_takes_back_a_running_job_once_two_heartbeats_leave_it_out() -> None:
    view = view_with_worker_holding("j1", max_attempts=3)
    beat(view, AFTER_MS, "j1")
    beat(view, AFTER_MS + 300)
    assert list(view.orphaned_jobs()) == []

    beat(view, AFTER_MS + 600)

    [(job, reason)] = view.orphaned_jobs()
    assert (job.id, job.status, reason) == ("j1", JobStatus.RUNNING, NOT_HELD_BY_WORKER)
    requeued = recover(job, reason=reason)
    assert isinstance(requeued, ev.JobRequeued)
    assert (requeued.attempt, requeued.reason) == (2, NOT_HELD_BY_WORKER)


def test_view_cancels_or_fails_a_job_not_held_like_a_lost_workers_job() -> None:
    cancelled = view_with_worker_holding("j1", max_attempts=3, cancel=True)
    exhausted = view_with_worker_holding("j2", max_attempts=1)
    for view in (cancelled, exhausted):
        beat(view, AFTER_MS)
        beat(view, AFTER_MS + 300)

    [(job, reason)] = cancelled.orphaned_jobs()
    outcome = recover(job, reason=reason)
    assert isinstance(outcome, ev.JobCancelled)
    assert (outcome.job_id, outcome.reason) == ("j1", NOT_HELD_BY_WORKER)
    [(job, reason)] = exhausted.orphaned_jobs()
    failed = recover(job, reason=reason)
    assert isinstance(failed, ev.JobFailed)
    assert (failed.attempt, failed.error.code, failed.error.details) == (
        1, "max_attempts_exceeded", {"reason": NOT_HELD_BY_WORKER, "worker_id": "w1", "max_attempts": 1}
    )


def test_view_gives_a_lost_workers_jobs_the_loss_as_reason() -> None:
    view = view_with_worker_holding("j1", max_attempts=3)
    beat(view, AFTER_MS)
    beat(view, AFTER_MS + 300)
    view.apply_worker_event(ev.WorkerLost(worker_id="w1", reason="silent"), 2, (AFTER_MS + 400) * 1000, now_s=0.0)

    assert [(job.id, reason) for job, reason in view.orphaned_jobs()] == [("j1", "worker_lost")]
