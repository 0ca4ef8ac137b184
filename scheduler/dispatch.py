"""Orders to workers: an assignment's dispatch and a cancel, published on the worker's DISPATCH subject.

An order is sent after its event is in the log, so the log stays the truth and a lost order is only late:
one that could not be sent is kept and sent again at the leader's next pass, and its message id
(`assign-<job>-<attempt>`, `cancel-<job>-<attempt>`) lets the server drop a copy that did arrive.

The orders of one pass are pipelined (`OrderBatch`): each is handed to the connection without waiting for
its acknowledgement, and the pass waits once, for all of them. A pass of 10,000 assignments costs one wait,
not 10,000 request round trips (a request per order cost 2-3x the CPU of a pipelined publish: docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NoStreamResponseError

from scheduler.view import SchedulerView
from sdk import subjects
from sdk.events import Assignment, CancelOrder, encoder
from sdk.jobs import HELD_BY_WORKER, Job, JobStatus

logger = logging.getLogger(__name__)

#: How long a batch's acknowledgements may take (as a lone JetStream publish's default timeout); an order
#: not acknowledged by then is kept and sent again, and its late acknowledgement is ignored.
ACK_TIMEOUT_S = 5.0
#: Orders awaiting their acknowledgement, at most: a batch waits for those before it sends more. Below
#: nats-py's own limit (4,000 per JetStream context, and only `Orders` publishes through the scheduler's),
#: so `publish_async` never waits for a place: one that may wait starts a task per publish (`wait_for`),
#: and each yields to the loop, which then writes every order to the socket on its own.
MAX_IN_FLIGHT = 2000


class Orders:
    def __init__(self, js: JetStreamContext, *, on_no_stream: Callable[[], None]) -> None:
        self._js = js
        #: Called when DISPATCH is missing (a restarted broker lost it): the owner makes it again.
        self.on_no_stream = on_no_stream
        #: Jobs whose assignment is in the log and still needs (another try at) its dispatch.
        self.redispatch: set[str] = set()
        #: Jobs whose cancel request is in the log and still needs its order to the worker.
        self.cancels: set[str] = set()

    def batch(self) -> OrderBatch:
        """A batch of orders, published pipelined and confirmed together."""
        return OrderBatch(self._js, self)

    async def send(self, view: SchedulerView) -> None:
        """Send every pending order whose job still needs it, as the view has the job now."""
        redispatch, self.redispatch = self.redispatch, set()
        cancels, self.cancels = self.cancels, set()
        batch = self.batch()
        for job_id in redispatch | cancels:
            job = view.jobs.get(job_id)
            worker = view.workers.get(job.worker_id or "") if job is not None else None
            if job is None or worker is None:
                continue  # finished, or requeued meanwhile: nothing to send
            if job_id in redispatch and job.status is JobStatus.ASSIGNED:
                await batch.dispatch(job, worker.worker_id, worker.region)
            if job_id in cancels and job.status in HELD_BY_WORKER:
                await batch.cancel(job, worker.worker_id, worker.region)
        await batch.confirm()


@dataclass(frozen=True)
class _Sent:
    order: Assignment | CancelOrder
    worker_id: str
    #: None: never handed to the connection (it is away, or too many publishes wait for their acks).
    ack: asyncio.Future[js_api.PubAck] | None


class OrderBatch:
    """One pass's orders: `dispatch`/`cancel` publish without waiting, `confirm` waits for all the acks
    and keeps every order that was not stored for the next pass."""

    def __init__(self, js: JetStreamContext, orders: Orders) -> None:
        self._js = js
        #: Where an order that was not stored is kept for the next pass.
        self._orders = orders
        self._sent: list[_Sent] = []
        #: Acknowledgements not waited for yet.
        self._in_flight: list[asyncio.Future[js_api.PubAck]] = []
        #: Set once the connection refused a publish: the rest of the batch is kept without trying.
        self._refused: Exception | None = None

    async def dispatch(self, job: Job, worker_id: str, region: str) -> None:
        order = Assignment(
            job_id=job.id,
            attempt=job.attempt,
            job_type=job.type,
            model=job.model,
            params=job.params,
            timeout_s=job.timeout_s,
        )
        await self._publish(worker_id, region, order, msg_id=f"assign-{job.id}-{job.attempt}")

    async def cancel(self, job: Job, worker_id: str, region: str) -> None:
        order = CancelOrder(job_id=job.id, attempt=job.attempt)
        await self._publish(worker_id, region, order, msg_id=f"cancel-{job.id}-{job.attempt}")

    async def _publish(self, worker_id: str, region: str, order: Assignment | CancelOrder, *, msg_id: str) -> None:
        """Hand the order to the connection; the message id makes a retry harmless."""
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            await self._wait_for_acks()
        ack = None
        if self._refused is None:
            try:
                ack = await self._js.publish_async(
                    subjects.dispatch_subject(region, worker_id),
                    encoder.encode(order),
                    headers={subjects.MSG_ID_HEADER: msg_id},
                )
            except (nats.errors.Error, TimeoutError) as exc:
                self._refused = exc
            else:
                self._in_flight.append(ack)
        self._sent.append(_Sent(order, worker_id, ack))

    async def _wait_for_acks(self) -> None:
        waiting, self._in_flight = self._in_flight, []
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=ACK_TIMEOUT_S)
            for ack in late:
                ack.cancel()  # frees its place among nats-py's outstanding publishes

    async def confirm(self) -> None:
        """Wait for every acknowledgement; an order not stored is kept for the next pass."""
        await self._wait_for_acks()
        sent, self._sent = self._sent, []
        failed: list[tuple[_Sent, BaseException]] = []
        for s in sent:
            error = self._error(s)
            if error is None:
                if isinstance(s.order, CancelOrder):
                    logger.info("job %s: cancel order sent to worker %s", s.order.job_id, s.worker_id)
                continue
            failed.append((s, error))
            kept = self._orders.redispatch if isinstance(s.order, Assignment) else self._orders.cancels
            kept.add(s.order.job_id)
        if not failed:
            return
        if any(isinstance(error, NoStreamResponseError) for _, error in failed):
            logger.warning("%d orders found no DISPATCH stream (a restarted broker?); re-creating it", len(failed))
            self._orders.on_no_stream()
            return
        # Not woken again for them: the next pass (a tick or an event later) retries.
        first, error = failed[0]
        logger.warning("%d orders not sent (job %s to worker %s: %r); retrying",
                       len(failed), first.order.job_id, first.worker_id, error)

    def _error(self, sent: _Sent) -> BaseException | None:
        """Why an order was not stored, or None."""
        if sent.ack is None:
            return self._refused
        if sent.ack.cancelled():
            return TimeoutError(f"no acknowledgement within {ACK_TIMEOUT_S}s")
        return sent.ack.exception()
