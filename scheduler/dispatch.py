"""Orders to workers: an assignment's dispatch and a cancel, published on the worker's DISPATCH subject.

An order is sent after its event is in the log, so the log stays the truth and a lost order is only late:
one that could not be sent is kept and sent again at the leader's next pass, and its message id
(`assign-<job>-<attempt>`, `cancel-<job>-<attempt>`) lets the server drop a copy that did arrive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from scheduler.view import SchedulerView
from sdk import subjects
from sdk.events import Assignment, CancelOrder, encoder
from sdk.jobs import HELD_BY_WORKER, Job, JobStatus

logger = logging.getLogger(__name__)


class Orders:
    def __init__(self, js: JetStreamContext, *, on_no_stream: Callable[[], None]) -> None:
        self._js = js
        #: Called when DISPATCH is missing (a restarted broker lost it): the owner makes it again.
        self._on_no_stream = on_no_stream
        #: Jobs whose assignment is in the log and still needs (another try at) its dispatch.
        self.redispatch: set[str] = set()
        #: Jobs whose cancel request is in the log and still needs its order to the worker.
        self.cancels: set[str] = set()

    async def send(self, view: SchedulerView) -> None:
        """Send every pending order whose job still needs it, as the view has the job now."""
        redispatch, self.redispatch = self.redispatch, set()
        cancels, self.cancels = self.cancels, set()
        sends = []
        for job_id in redispatch | cancels:
            job = view.jobs.get(job_id)
            worker = view.workers.get(job.worker_id or "") if job is not None else None
            if job is None or worker is None:
                continue  # finished, or requeued meanwhile: nothing to send
            if job_id in redispatch and job.status is JobStatus.ASSIGNED:
                sends.append(self.dispatch(job, worker.worker_id, worker.region))
            if job_id in cancels and job.status in HELD_BY_WORKER:
                sends.append(self._cancel(job, worker.worker_id, worker.region))
        await asyncio.gather(*sends)

    async def dispatch(self, job: Job, worker_id: str, region: str) -> None:
        order = Assignment(
            job_id=job.id,
            attempt=job.attempt,
            job_type=job.type,
            model=job.model,
            params=job.params,
            timeout_s=job.timeout_s,
        )
        if not await self._publish(worker_id, region, order, msg_id=f"assign-{job.id}-{job.attempt}"):
            self.redispatch.add(job.id)

    async def _cancel(self, job: Job, worker_id: str, region: str) -> None:
        order = CancelOrder(job_id=job.id, attempt=job.attempt)
        if await self._publish(worker_id, region, order, msg_id=f"cancel-{job.id}-{job.attempt}"):
            logger.info("job %s: cancel order sent to worker %s", job.id, worker_id)
        else:
            self.cancels.add(job.id)

    async def _publish(self, worker_id: str, region: str, order: Assignment | CancelOrder, *, msg_id: str) -> bool:
        """Publish to the worker's dispatch subject; the message id makes a retry harmless."""
        try:
            await self._js.publish(
                subjects.dispatch_subject(region, worker_id),
                encoder.encode(order),
                headers={subjects.MSG_ID_HEADER: msg_id},
            )
        except NoStreamResponseError:
            logger.warning("job %s: no DISPATCH stream (a restarted broker?); re-creating it", order.job_id)
            self._on_no_stream()
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            # Not woken again for it: the next pass (a tick or an event later) retries.
            logger.warning("job %s: %s for worker %s not sent (%r); retrying",
                           order.job_id, type(order).__name__, worker_id, exc)
            return False
        return True
