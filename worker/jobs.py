"""The job runner: takes this worker's dispatches and runs each job from receipt to ack.

Dispatches arrive on `dispatch.<region>.<worker_id>` through the worker's own durable push consumer.
A `CancelOrder` stops a running job. An `Assignment` waits for a concurrency slot (`max_concurrency` of
the runtime config; it may change while jobs hold slots), passes `preflight`, is reported started, is
run by the engine of its job type (with its model leased from the cache, its timeout and its cancel),
and is reported completed, failed or cancelled (`outcome_report`); only then is its dispatch acked.
A job that ends within `START_GRACE_S` reports its start with its ending, in one request.
A dispatch is never acked before its outcome is reported: if the worker dies meanwhile, JetStream
redelivers it, or the platform requeues the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

from sdk import subjects
from sdk.api import (
    OutcomeReport,
    ReportCancelled,
    ReportFailed,
    ReportProgress,
    ReportStarted,
    StreamChunk,
    WorkerReport,
)
from sdk.errors import InvalidTransition, JobNotFound, PlatformError, StaleAttempt, Timeout, Unavailable
from sdk.events import Assignment, CancelOrder, dispatch_decoder
from worker.engines.base import EngineError, JobContext
from worker.execution import EngineHost
from worker.outcomes import Interrupted, outcome_report, preflight

logger = logging.getLogger(__name__)

#: Progress reports are coalesced to at most one per interval per job (each one is an event in the log).
PROGRESS_INTERVAL_S = 0.5
#: JetStream redelivers an unacked dispatch after this; a held job renews it every third of it.
DISPATCH_ACK_WAIT_S = 60.0

#: A job whose engine ends within this long of starting reports its start and its ending in one request
#: (`with_start`: one signed round trip and one fsynced append instead of two of each); a longer one reports
#: `started` this much later than it began. It bounds what a job ending just after it can lose.
START_GRACE_S = 0.02

#: The platform's answers that mean "this attempt is not yours (any more)": never retried.
NOT_YOURS = (StaleAttempt, InvalidTransition, JobNotFound)


@dataclass(eq=False, kw_only=True)
class JobRunner(EngineHost):
    """Runs the jobs dispatched to this worker, at most `max_concurrency` at once."""

    #: How long reports about a job keep retrying an unanswered gateway (it may be restarting).
    request_retry_s: float
    #: Jobs finished and reported (completed, failed or cancelled) since the worker started.
    jobs_done: int = field(default=0, init=False)
    #: Set once the worker stops taking jobs (heartbeats then say `draining`).
    stopping: bool = field(default=False, init=False)
    _slots: _Slots = field(init=False)
    _jobs: dict[tuple[str, int], _HeldJob] = field(default_factory=dict, init=False)
    _dispatch_sub: JetStreamContext.PushSubscription | None = field(default=None, init=False)
    _abandon: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self) -> None:
        self._slots = _Slots(self.config.current.max_concurrency)

    @property
    def in_flight(self) -> tuple[str, ...]:
        """Ids of the jobs this worker holds: running, or waiting for a free slot."""
        return tuple(dict.fromkeys(job_id for job_id, _ in self._jobs))

    def resize(self, max_concurrency: int) -> None:
        """A new concurrency: more jobs start at once; fewer never stops a running one."""
        self._slots.resize(max_concurrency)

    async def start(self, worker_id: str, region: str) -> None:
        """Subscribe to this worker's dispatches, through its own durable consumer (again after a broker
        restart lost it: the old subscription goes first)."""
        if self._dispatch_sub is not None:
            with contextlib.suppress(Exception):
                await self._dispatch_sub.unsubscribe()
        self._dispatch_sub = await self.link.js.subscribe(
            subjects.dispatch_subject(region, worker_id),
            durable=subjects.dispatch_consumer(worker_id),
            stream=subjects.DISPATCH_STREAM,
            cb=self._on_dispatch,
            manual_ack=True,
            config=js_api.ConsumerConfig(
                # Named, so the create request carries its filter in the subject: the only form this
                # worker's NATS identity may send (`gateway/bus/permissions.py`).
                name=subjects.dispatch_consumer(worker_id),
                ack_policy=js_api.AckPolicy.EXPLICIT, ack_wait=DISPATCH_ACK_WAIT_S, max_deliver=-1,
            ),
        )

    async def stop_taking(self) -> None:
        """Take no new dispatches. Jobs still waiting for a slot go back (nak): they are redelivered as soon
        as this worker returns (or requeued by the platform if it does not)."""
        self.stopping = True
        if self._dispatch_sub is not None:
            with contextlib.suppress(Exception):
                await self._dispatch_sub.unsubscribe()
        for held in list(self._jobs.values()):
            if not held.running:
                held.task.cancel()
                with contextlib.suppress(Exception):
                    await held.msg.nak()

    def abandon(self) -> None:
        """Cut a drain short: running jobs are left unacked, for the platform to requeue."""
        self._abandon.set()

    async def drain(self, timeout_s: float) -> None:
        """Let running jobs finish for up to `timeout_s` (or until `abandon`), then cut off the rest."""
        pending = {held.task for held in self._jobs.values()}
        if pending and timeout_s > 0:
            logger.info("waiting up to %.0fs for %d jobs to finish", timeout_s, len(pending))
            abandon = asyncio.create_task(self._abandon.wait())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while pending and not abandon.done() and (remaining_s := deadline - loop.time()) > 0:
                _, pending = await asyncio.wait(
                    pending | {abandon}, timeout=remaining_s, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(abandon)
            abandon.cancel()
        left = [held for held in self._jobs.values() if not held.task.done()]
        if left:
            logger.warning(
                "abandoning %d jobs (%s); the platform will requeue them",
                len(left), ", ".join(f"{h.assignment.job_id}#{h.assignment.attempt}" for h in left),
            )
        for held in left:
            held.task.cancel()
        await asyncio.gather(*(held.task for held in left), return_exceptions=True)

    # --- Dispatches ------------------------------------------------------------------------------------

    async def _on_dispatch(self, msg: Msg) -> None:
        # Callbacks of one subscription run one at a time: hand each job to its own task at once.
        try:
            dispatch = dispatch_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.error("dropping an unreadable dispatch: %s", exc)
            await msg.term()
            return
        match dispatch:
            case CancelOrder():
                self._cancel(dispatch)
                await msg.ack()
            case Assignment():
                self._hold(dispatch, msg)

    def _cancel(self, order: CancelOrder) -> None:
        held = self._jobs.get((order.job_id, order.attempt))
        if held is None:
            logger.info("cancel for job %s attempt %d, which is not running here", order.job_id, order.attempt)
            return
        logger.info("cancelling job %s attempt %d", order.job_id, order.attempt)
        held.cancel_requested = True
        held.ctx.cancelled.set()

    def _hold(self, assignment: Assignment, msg: Msg) -> None:
        key = (assignment.job_id, assignment.attempt)
        if key in self._jobs:
            # A redelivery of a job that is running here (its ack deadline slipped): the first copy acks.
            logger.info("job %s attempt %d is already here; ignoring its redelivery", *key)
            return
        if self.stopping:
            return  # left unacked: redelivered when this worker is back
        held = _HeldJob(assignment, msg)
        progress = _Progress(partial(self._send_progress, held))
        held.progress = progress
        held.ctx = JobContext(
            assignment.job_id,
            assignment.attempt,
            assignment.params,
            emit=partial(self._emit, held),
            progress=progress.offer,
            store_object=partial(self.link.store_object, assignment.job_id, assignment.attempt),
        )
        self._jobs[key] = held
        held.task = asyncio.create_task(self._run(held))

    # --- One job ----------------------------------------------------------------------------------------

    async def _run(self, held: _HeldJob) -> None:
        a = held.assignment
        keep_alive = _KeepAlive(held.msg)
        try:
            await self._slots.acquire()
            try:
                held.running = True
                await self._execute(held)
            finally:
                self._slots.release()
        except asyncio.CancelledError:
            logger.info("job %s attempt %d left unfinished (worker stopping)", a.job_id, a.attempt)
            raise
        except Exception:
            # A bug here must not take the worker down; the dispatch stays unacked and comes back.
            logger.exception("job %s attempt %d: runtime error", a.job_id, a.attempt)
        finally:
            keep_alive.cancel()
            held.progress.close()
            del self._jobs[(a.job_id, a.attempt)]

    async def _execute(self, held: _HeldJob) -> None:
        a = held.assignment
        if held.ctx.cancelled.is_set():  # cancelled while it waited for a slot
            await self._finish(held, ReportCancelled(job_id=a.job_id, attempt=a.attempt))
            return
        refusal = preflight(a, self.engines, self.config.current)
        if refusal is not None:
            logger.warning("job %s attempt %d refused: %s", a.job_id, a.attempt, refusal.message)
            await self._finish(held, ReportFailed(job_id=a.job_id, attempt=a.attempt, error=refusal))
            return
        # The engine starts at once. A job that ends within the grace (echo) reports its start with its
        # ending; a longer one reports `started` while it runs, and its ending only once the start is
        # accepted. Either way the log reads started, then the ending. A refused start stops the engine.
        outcome = asyncio.create_task(self._outcome(held))
        ended_in_grace = False
        try:
            await asyncio.wait({outcome}, timeout=START_GRACE_S)
            ended_in_grace = outcome.done()
            if not ended_in_grace:
                await self._report(ReportStarted(job_id=a.job_id, attempt=a.attempt))
        except PlatformError as exc:
            held.ctx.cancelled.set()
            await asyncio.gather(outcome, return_exceptions=True)
            if isinstance(exc, (Timeout, Unavailable)):
                logger.error("could not report job %s started (%s); it will be redelivered", a.job_id, exc.message)
                return
            if isinstance(exc, NOT_YOURS):
                logger.info("dropping dispatch of job %s attempt %d: %s", a.job_id, a.attempt, exc.message)
            else:
                logger.error("job %s attempt %d: start refused (%s); dropping it", a.job_id, a.attempt, exc.message)
            await held.msg.ack()
            return
        except BaseException:
            outcome.cancel()
            raise
        if ended_in_grace:
            await self._finish(held, msgspec.structs.replace(outcome.result(), with_start=True))
            return
        held.accepted.set()
        logger.info("job %s attempt %d started (%s)", a.job_id, a.attempt, a.job_type)
        await self._finish(held, await outcome)

    async def _outcome(self, held: _HeldJob) -> OutcomeReport:
        """Run the engine and turn how it ended into the report to send."""
        a = held.assignment
        try:
            result = await self.run(a, held.ctx, a.timeout_s)
        except Exception as exc:
            if not isinstance(exc, (EngineError, PlatformError, Interrupted)):
                logger.exception("job %s attempt %d: engine error", a.job_id, a.attempt)
            return outcome_report(a, cancel_requested=held.cancel_requested, error=exc)
        return outcome_report(a, cancel_requested=held.cancel_requested, result=result)

    async def _finish(self, held: _HeldJob, report: WorkerReport) -> None:
        """Report how the job ended, then ack its dispatch (also when the report is refused or lost:
        the platform requeues a job whose outcome it never heard)."""
        a = held.assignment
        held.progress.close()  # no progress report may land after the ending
        try:
            await self._report(report)
            with_start = " with its start" if isinstance(report, OutcomeReport) and report.with_start else ""
            logger.info("job %s attempt %d %s%s", a.job_id, a.attempt, report.__struct_config__.tag, with_start)
        except NOT_YOURS as exc:
            logger.warning("job %s attempt %d: %s refused: %s", a.job_id, a.attempt, type(report).__name__, exc.message)
        except PlatformError as exc:
            logger.error(
                "job %s attempt %d: %s not delivered: %s", a.job_id, a.attempt, type(report).__name__, exc.message
            )
        self.jobs_done += 1
        await held.msg.ack()

    async def _report(self, report: WorkerReport) -> None:
        """Reports about a job are retried while the gateway does not answer (it may be restarting)."""
        await self.link.report(report, retry_for_s=self.request_retry_s)

    # --- What a running job can do ----------------------------------------------------------------------

    async def _emit(self, held: _HeldJob, text: str) -> None:
        chunk = StreamChunk(offset=held.streamed_chars, text=text)
        held.streamed_chars += len(text)
        await self.link.publish_chunk(held.assignment.job_id, chunk)

    async def _send_progress(self, held: _HeldJob, fraction: float, message: str | None) -> None:
        a = held.assignment
        await held.accepted.wait()  # progress of a job not yet started would be refused as not ours
        try:
            await self.link.report(ReportProgress(job_id=a.job_id, attempt=a.attempt, progress=fraction, message=message))
        except NOT_YOURS as exc:
            # Requeued or finished elsewhere: stop spending the GPU on it.
            logger.warning(
                "job %s attempt %d is no longer this worker's (%s); stopping it", a.job_id, a.attempt, exc.message
            )
            held.ctx.cancelled.set()
        except Exception as exc:  # progress is best effort: it must never disturb the job
            logger.debug("progress of job %s not reported: %s", a.job_id, exc)


# --- Small parts of the runner ---------------------------------------------------------------------------


class _HeldJob:
    """A dispatched assignment from receipt to ack."""

    def __init__(self, assignment: Assignment, msg: Msg) -> None:
        self.assignment = assignment
        self.msg = msg
        #: Set once the job holds a concurrency slot (a stop leaves waiting jobs to be redelivered).
        self.running = False
        #: Set by a CancelOrder: the platform asked for the cancel, so the ending is `cancelled`.
        self.cancel_requested = False
        #: Characters streamed so far: each chunk carries its offset, so a reader can tell a gap.
        self.streamed_chars = 0
        #: Set once the platform accepted the `started` report (the engine may run before that).
        self.accepted = asyncio.Event()
        self.ctx: JobContext
        self.progress: _Progress
        self.task: asyncio.Task[None]


class _Slots:
    """A semaphore whose size can change while jobs hold it; shrinking never stops a running job."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.used < self.capacity and not self._waiters:
            self.used += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot came just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.used -= 1
        self._wake()

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.capacity:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)


class _Progress:
    """Coalesces one job's progress: at most one report per PROGRESS_INTERVAL_S, the latest value wins,
    and reporting never holds up the job."""

    def __init__(self, send: Callable[[float, str | None], Any]) -> None:
        self._send = send
        self._latest: tuple[float, str | None] | None = None
        self._sent_at = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def offer(self, fraction: float, message: str | None = None) -> None:
        if self._closed:
            return
        self._latest = (min(max(fraction, 0.0), 1.0), message[:1000] if message else message)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._latest is not None:
            wait_s = self._sent_at + PROGRESS_INTERVAL_S - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            fraction, message = self._latest
            self._latest = None
            self._sent_at = loop.time()
            await self._send(fraction, message)

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()


class _KeepAlive:
    """Tells JetStream, every third of the ack wait, that a dispatch is still being worked on, so it is not
    redelivered meanwhile. A timer rather than a task per job: most jobs end long before it first fires."""

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(DISPATCH_ACK_WAIT_S / 3, self._fire)
        self._extending: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        self._handle.cancel()
        if self._extending is not None:
            self._extending.cancel()

    def _fire(self) -> None:
        self._extending = self._loop.create_task(self._extend())
        self._handle = self._loop.call_later(DISPATCH_ACK_WAIT_S / 3, self._fire)

    async def _extend(self) -> None:
        try:
            await self._msg.in_progress()
        except Exception as exc:
            logger.debug("could not extend the ack deadline: %s", exc)
