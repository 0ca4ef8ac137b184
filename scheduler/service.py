"""The scheduler service: fold the streams into a view; as leader, place jobs and take back lost ones.

Thin by design: receive, decode, fold (`view.py`), decide (`placement.py`, `recovery.py`), append at the
expected sequence, publish. Every running scheduler folds JOBS, WORKERS, HEARTBEATS and the
`worker-config` bucket; only the holder of the KV lease (`lease.py`) writes, so a standby that takes over
already has a warm view.

Consumers only update the view and wake the leader's loop, which reacts at once to submissions,
requeues, finished jobs, registrations, heartbeats and config changes, and every `tick_s` sweeps for
silent workers and expired jobs. One pass appends all the assignments it decided as atomic batches
(`sdk.group_commit`) and publishes each dispatch once its assignment is stored, pipelined, with one wait
for all their acknowledgements: a burst of submissions costs a few round trips, not one per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec
import nats.errors
import stamina
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from scheduler import metrics
from scheduler.connections import WorkerConnections
from scheduler.dispatch import Orders
from scheduler.explain import PlacementQueries
from scheduler.index import PlacementIndex, plan
from scheduler.lease import LeaderLease
from scheduler.placement import Placement
from scheduler.recovery import recover
from scheduler.sessions import DirectSessions
from scheduler.view import SchedulerView, TrackedWorker
from sdk import subjects
from sdk.connection import connect
from sdk.events import (
    JobAssigned,
    JobCancelRequested,
    JobEnded,
    JobEvent,
    JobExpired,
    JobRequeued,
    JobSubmitted,
    WorkerLost,
    heartbeat_decoder,
    job_event_decoder,
    now_ms,
    worker_event_decoder,
)
from sdk.group_commit import GroupCommit
from sdk.jobs import HELD_BY_WORKER, Job, JobStatus, apply
from sdk.log import FEED_IDLE_HEARTBEAT_S, WrongLastSequence, ack_fields, append, ensure_streams, load_job
from sdk.metrics import DEFAULT_METRICS_HOST, metrics_endpoint
from sdk.platform_config import RegionsWatch
from sdk.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

#: A new leader re-sends the assignments of this age or younger, in case the old leader died between the
#: append and the dispatch. Well inside DISPATCH's de-duplication window (two minutes, the JetStream
#: default), so the server drops a re-sent assignment that did arrive (same `Nats-Msg-Id`).
REDISPATCH_WINDOW_S = 60.0
#: How long `stop()` lets the pass in progress finish, so an appended assignment is also dispatched.
STOP_GRACE_S = 5.0
#: After the broker comes back, no worker is declared lost for this long plus its usual allowance: the
#: workers reconnect after the services (through the gateway's auth callout, a connect may wait 2 s) and
#: their heartbeats could not be stored meanwhile. Without it a broker restart declared every worker lost
#: and requeued every job (docs/reliability.md).
RECONNECT_GRACE_S = 5.0

def _holds(job: Job, assignment: JobAssigned) -> bool:
    """The job is assigned as `assignment` says and has not moved on."""
    return (job.status, job.worker_id, job.attempt) == (JobStatus.ASSIGNED, assignment.worker_id, assignment.attempt)


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Scheduler:
    def __init__(self, nc: NatsClient, *, instance_id: str, tick_s: float = 0.25) -> None:
        self.instance_id = instance_id
        self.tick_s = tick_s
        self.view = SchedulerView()
        self._nc = nc
        self._js = nc.jetstream()
        #: Appends to JOBS: the assignments of one pass go as one atomic batch (one fsync).
        self._log = GroupCommit(self._js)
        self._lease = LeaderLease(self._js, holder=instance_id, on_change=self._on_leadership)
        self._rng = random.Random()
        self._wake = asyncio.Event()
        #: Feeds (streams and the config bucket) not yet replayed to their end; the leader waits for them.
        self._catching_up: set[str] = set()
        self._subscriptions: list[JetStreamContext.PushSubscription] = []
        self._config_watcher: KeyValue.KeyWatcher | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        #: The lease term whose take-over duties are done.
        self._settled_term = 0
        self._last_sweep_s = 0.0
        #: Jobs whose assignment or cancel order must be (re)sent to their worker.
        self._orders = Orders(self._js, on_no_stream=self.broker_restarted)
        #: Re-creating what a restarted broker lost; placing and dispatching wait for it.
        self._restoring: asyncio.Task[None] | None = None
        self._stopping = False
        #: The operator's latency table between regions, followed live (`platform-config`, key `regions`).
        self.regions = RegionsWatch(self._js)
        #: Workers' connections closing (the gateway forwards nats-server's advisories): a faster loss.
        self._connections = WorkerConnections()
        self._queries = PlacementQueries(nc, self.view, lambda: self.regions.table, lambda: not self._catching_up)
        #: Held by a pass's placement, and by a direct session's, so both count the same free slots.
        self._placing = asyncio.Lock()
        self._sessions = DirectSessions(
            nc, self.view, latencies=lambda: self.regions.table, leading=lambda: self.is_leader,
            ready=lambda: not self._catching_up, placing=self._placing, rng=self._rng, slot_freed=self._wake.set,
        )

    @property
    def is_leader(self) -> bool:
        return self._lease.is_leader

    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._catching_up = {
            subjects.JOBS_STREAM,
            subjects.WORKERS_STREAM,
            subjects.HEARTBEATS_STREAM,
            subjects.SESSIONS_STREAM,
            subjects.WORKER_CONFIG_BUCKET,
        }
        await self._follow(subjects.JOBS_STREAM, subjects.JOBS_SUBJECTS, self._on_job)
        await self._follow(subjects.WORKERS_STREAM, subjects.WORKERS_SUBJECTS, self._on_worker)
        await self._follow(subjects.HEARTBEATS_STREAM, subjects.HEARTBEATS_SUBJECTS, self._on_heartbeat)
        await self._follow(subjects.SESSIONS_STREAM, subjects.SESSIONS_SUBJECTS, self._sessions.on_event)
        kv = await self._js.key_value(subjects.WORKER_CONFIG_BUCKET)
        self._config_watcher = await kv.watchall()
        self._watch_task = asyncio.create_task(
            self._watch_config(self._config_watcher), name=f"config-{self.instance_id}"
        )
        await self.regions.start()
        await self._connections.follow(self._nc, on_change=self._wake.set)
        await self._queries.start()
        await self._sessions.start()
        self._loop_task = asyncio.create_task(self._run(), name=f"scheduler-{self.instance_id}")
        await self._lease.start()
        logger.info("scheduler %s started", self.instance_id)

    async def stop(self) -> None:
        """Idempotent. Finish the pass in progress, hand the lease over, then stop folding."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        # 1. The loop ends after its current pass, so no appended assignment is left undispatched.
        if self._loop_task is not None:
            _, pending = await asyncio.wait({self._loop_task}, timeout=STOP_GRACE_S)
            for task in pending:
                task.cancel()
        # 2. Release the lease: a standby takes over at its next try instead of after the TTL.
        await self._lease.stop()
        # 3. Stop the feeds and the queries (the connection may be gone already: nothing to unsubscribe then).
        with contextlib.suppress(nats.errors.Error):
            await self._queries.stop()
            await self._connections.stop()
            await self._sessions.stop()
            await self.regions.stop()
            if self._config_watcher is not None:
                await self._config_watcher.stop()
            for sub in self._subscriptions:
                await sub.unsubscribe()
        await cancel_and_wait(self._loop_task, self._watch_task, self._restoring)
        logger.info("scheduler %s stopped", self.instance_id)

    # --- feeds: fold every stream into the view ---------------------------------------------------

    async def _follow(self, stream: str, subject: str, handle: Callable[[Msg, int, int], None]) -> None:
        """Fold `stream` from its start; `handle(msg, stream sequence, stored at µs)` for each message."""

        async def on_msg(msg: Msg) -> None:
            # One split of the reply subject: nats-py's `msg.metadata` cost ten times as much CPU, for every
            # event of every job (docs/benchmarks.md, "The scheduler alone").
            seq, stored_at_ns, pending = ack_fields(msg.reply)
            try:
                handle(msg, seq, stored_at_ns // 1000)
            except msgspec.DecodeError as exc:
                logger.warning("skipping an undecodable message on %s: %s", msg.subject, exc)
            if pending == 0:
                self._caught_up(stream)

        sub = await self._js.subscribe(
            subject, stream=stream, cb=on_msg, ordered_consumer=True, deliver_policy=js_api.DeliverPolicy.ALL,
            idle_heartbeat=FEED_IDLE_HEARTBEAT_S,
        )
        self._subscriptions.append(sub)
        if (await sub.consumer_info()).num_pending == 0:
            self._caught_up(stream)

    def _caught_up(self, feed: str) -> None:
        if feed in self._catching_up:
            self._catching_up.discard(feed)
            if not self._catching_up:
                logger.info("scheduler %s: view caught up with the streams", self.instance_id)
                self._wake.set()

    def _on_job(self, msg: Msg, seq: int, stored_at_us: int) -> None:
        event: JobEvent = job_event_decoder.decode(msg.data)
        job = self.view.apply_job_event(event, seq)
        if job is None:
            return
        match event:
            case JobSubmitted() | JobRequeued() | JobEnded():
                self._wake.set()  # a job to place, or a slot freed (an expired job held none: a spare pass)
            case JobCancelRequested() if self.is_leader:
                self._orders.cancels.add(job.id)
                self._wake.set()

    def _on_worker(self, msg: Msg, seq: int, stored_at_us: int) -> None:
        event = worker_event_decoder.decode(msg.data)
        self.view.apply_worker_event(event, seq, stored_at_us, time.monotonic())
        self._wake.set()

    def _on_heartbeat(self, msg: Msg, seq: int, stored_at_us: int) -> None:
        heartbeat = heartbeat_decoder.decode(msg.data)
        self.view.apply_heartbeat(heartbeat, stored_at_us, time.monotonic())
        self._wake.set()

    async def _watch_config(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # the watcher's marker: every existing key has been delivered
                self._caught_up(subjects.WORKER_CONFIG_BUCKET)
                continue
            try:
                deleted = entry.operation in (KV_DEL, KV_PURGE)
                partial = None if deleted else msgspec.json.decode(entry.value or b"{}", type=dict[str, Any])
            except msgspec.DecodeError as exc:
                logger.warning("ignoring worker-config key %s: %s", entry.key, exc)
                continue
            self.view.set_config(entry.key, partial)
            self._wake.set()

    def _on_leadership(self, leading: bool) -> None:
        self._wake.set()

    # --- the leader's loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            self._wake.clear()
            if self._stopping or not self.is_leader or self._catching_up or not self._nc.is_connected:
                continue  # a leader cut off from the broker waits for it instead of retrying every tick
            try:
                await self._lead()
            except Exception:
                # A leader that stops scheduling after one bad pass is worse than one that logs and retries.
                logger.exception("scheduler %s: pass failed; retrying", self.instance_id)

    async def _lead(self) -> None:
        if self._lease.term != self._settled_term:
            self._take_office()
        now_s = time.monotonic()
        if now_s - self._last_sweep_s >= self.tick_s:
            self._last_sweep_s = now_s
            await self._sweep(now_s)
        if self._restoring is not None and not self._restoring.done():
            return  # no stream to dispatch to yet: placing now would only assign jobs nobody receives
        await self._orders.send(self.view)
        await self._place()

    def _take_office(self) -> None:
        """A new term: re-send what the previous leader may have appended but not sent."""
        self._settled_term = self._lease.term
        recent_ms = now_ms() - REDISPATCH_WINDOW_S * 1000
        for job in self.view.jobs.values():
            if job.status is JobStatus.ASSIGNED and (job.assigned_at_ms or 0) >= recent_ms:
                self._orders.redispatch.add(job.id)
            if job.status in HELD_BY_WORKER and job.cancel_requested:
                self._orders.cancels.add(job.id)

    async def _place(self) -> None:
        if not self.view.queued_count:
            return
        async with self._placing:
            index = PlacementIndex(self.view.candidates().values(), self.regions.table)
            if index.free_slots <= 0:
                return  # every slot is taken: ordering a long queue would change nothing
            with metrics.PASS_SECONDS.time():
                decisions = plan(self.view.queued(), index, self._rng.random)
                await self._assign(decisions)

    async def _assign(self, decisions: list[tuple[Job, Placement, str]]) -> None:
        """Append a pass's assignments together (group commit: one atomic batch per `MAX_BATCH`), publish
        each job's dispatch once its batch is stored, and wait once for all the dispatches' acks."""
        events = [
            JobAssigned(job_id=job.id, worker_id=placement.worker_id, region=placement.region, attempt=job.attempt,
                        distance_ms=placement.distance_ms, rank=why)
            for job, placement, why in decisions
        ]
        acks = self._log.append_many([(subjects.job_subject(e.job_id), e, job.seq) for (job, _, _), e in zip(decisions, events)])
        orders = self._orders.batch()
        refused = []
        for (job, placement, why), event, pending in zip(decisions, events, acks):
            try:
                ack = await pending  # at once for every job but the first of a batch
            except (WrongLastSequence, nats.errors.Error, TimeoutError) as exc:
                refused.append(self._not_appended(job, event, exc))  # no dispatch without the assignment
                continue
            assigned = self._applied(job, event, ack)
            metrics.ASSIGNMENTS.inc()
            logger.debug("job %s attempt %d -> worker %s (%s)", job.id, job.attempt, placement.worker_id, why)
            await orders.dispatch(assigned, placement.worker_id, placement.region)
        await asyncio.gather(orders.confirm(), *refused)

    async def _sweep(self, now_s: float) -> None:
        """Declare silent workers, and workers whose connection closed for good, lost; take back the jobs of
        gone workers and the jobs that living workers say they do not hold; expire jobs that waited too long."""
        for worker, closed_s in self._connections.closed(self.view, now_s):
            if await self._declare_lost(worker, f"its connection closed {closed_s:.1f}s ago and did not open again"):
                self._connections.forget(worker.worker_id)
        for worker, silent_s in self.view.overdue_workers(now_s):
            await self._declare_lost(worker, f"no heartbeat for {silent_s:.1f}s")
        outcomes: list[tuple[Job, JobEvent, str]] = [
            (job, recover(job, reason=reason), reason) for job, reason in self.view.orphaned_jobs()
        ]
        self._sessions.sweep()
        expired = self.view.expired_jobs(now_ms())
        outcomes += [(job, JobExpired(job_id=job.id), "waited past its timeout") for job in expired]
        await asyncio.gather(*(self._settle(job, event, why) for job, event, why in outcomes))

    async def _declare_lost(self, worker: TrackedWorker, reason: str) -> bool:
        """Append `WorkerLost`; False when the worker's log moved on first (the next sweep looks again)."""
        event = WorkerLost(worker_id=worker.worker_id, reason=reason)
        try:
            ack = await append(self._js, subjects.worker_subject(worker.worker_id), event, expected_seq=worker.seq)
        except WrongLastSequence:
            return False  # the worker did something we have not folded yet
        self.view.mark_lost(worker.worker_id, ack.seq)
        logger.info("worker %s lost: %s", worker.worker_id, event.reason)
        return True

    async def _settle(self, job: Job, event: JobEvent, why: str) -> None:
        if await self._append(job, event) is not None:
            logger.info("job %s (attempt %d, worker %s): %s, %s",
                        job.id, job.attempt, job.worker_id, type(event).__name__, why)

    async def _append(self, job: Job, event: JobEvent) -> Job | None:
        """Append at the job's expected sequence and apply it to the view; None if it did not land."""
        try:
            ack = await self._log.append(subjects.job_subject(job.id), event, expected_seq=job.seq)
        except (WrongLastSequence, nats.errors.Error, TimeoutError) as exc:
            await self._not_appended(job, event, exc)
            return None
        return self._applied(job, event, ack)

    def _applied(self, job: Job, event: JobEvent, ack: js_api.PubAck) -> Job:
        new = apply(job, event, ack.seq)
        self.view.put_job(new)
        return new

    async def _not_appended(self, job: Job, event: JobEvent, exc: Exception) -> None:
        """An append refused, or not confirmed: decide again from the log."""
        if isinstance(exc, WrongLastSequence):
            await self._reload(job.id)  # someone else wrote first
            return
        # The append may have landed without an answer reaching us: the log says which.
        logger.warning("job %s: %s not confirmed (%r); reloading", job.id, type(event).__name__, exc)
        reloaded = await self._reload(job.id)
        if isinstance(event, JobAssigned) and reloaded is not None and _holds(reloaded, event):
            self._orders.redispatch.add(job.id)  # our assignment landed: it still needs its dispatch

    async def _reload(self, job_id: str) -> Job | None:
        try:
            job = await load_job(self._js, job_id)
        except (nats.errors.Error, TimeoutError) as exc:
            logger.warning("job %s: reload failed (%r); the next pass retries", job_id, exc)
            return None
        if job is not None:
            self.view.put_job(job)
        self._wake.set()
        return job

    # --- a restarted broker ---------------------------------------------------------------------

    def reconnected(self) -> None:
        """The connection came back: the broker was away, so the workers' silence meanwhile was not theirs."""
        self.view.excuse_silence(time.monotonic() + RECONNECT_GRACE_S)
        self.broker_restarted()

    def broker_restarted(self) -> None:
        """The connection came back, or a dispatch found no stream: the server may have restarted and lost
        what lives in its memory (DISPATCH). Re-create it in the background; idempotent while it runs."""
        if self._stopping or (self._restoring is not None and not self._restoring.done()):
            return
        self._restoring = asyncio.create_task(self._restore(), name=f"restore-{self.instance_id}")

    async def _restore(self) -> None:
        # The server may still be recovering its streams: back off, up to 5 s (stamina logs each retry,
        # one line per interval), instead of retrying every pass.
        retries = stamina.retry_context(on=(nats.errors.Error, TimeoutError), attempts=None, timeout=None, wait_initial=0.25)
        async for attempt in retries:
            with attempt:
                await ensure_streams(self._js)
        logger.info("scheduler %s: streams in place after a reconnect; dispatching again", self.instance_id)
        self._wake.set()


async def serve(
    nats_url: str, stop: asyncio.Event, instance_id: str | None = None, *,
    metrics_port: int | None = None, metrics_host: str = DEFAULT_METRICS_HOST,
) -> None:
    """Run one scheduler instance (leader or standby) until `stop` is set; its own metrics on `metrics_port`."""
    instance_id = instance_id or default_instance_id()
    scheduler: Scheduler | None = None

    async def on_reconnect() -> None:
        if scheduler is not None:
            scheduler.reconnected()

    nc = await connect(nats_url, name=f"scheduler-{instance_id}", on_reconnect=on_reconnect)
    try:
        await ensure_streams(nc.jetstream())
        async with Scheduler(nc, instance_id=instance_id) as scheduler:
            with metrics_endpoint(metrics_port, metrics.readings(scheduler), host=metrics_host):
                await stop.wait()
    finally:
        await nc.drain()
