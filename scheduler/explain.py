"""The scheduler's answer to "why is this job not placed?" (`sched.placement`, queue group `scheduler`).

The explanation lives with the decision: the scheduler computes it on request, from the same view and
latency table it places with, so it is never stale and costs nothing while nobody asks. Every instance
folds the same streams, so a standby answers as well as the leader (until it has caught up, it answers
`Unavailable`). The gateway asks only about queued jobs: a placed job explains itself from its
`JobAssigned` in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from scheduler.placement import explain
from scheduler.view import SchedulerView
from sdk import subjects
from sdk.api import decode
from sdk.endpoints import Endpoints
from sdk.errors import JobNotFound, Unavailable
from sdk.jobs import JobStatus
from sdk.placement import ExplainPlacement, PlacementView
from sdk.regions import LatencyTable, effective_policy

logger = logging.getLogger(__name__)


def explain_job(view: SchedulerView, job_id: str, latencies: LatencyTable) -> PlacementView:
    """Where the view has the job, and why; `JobNotFound` when it is not live here."""
    job = view.jobs.get(job_id)
    if job is None:
        raise JobNotFound(f"job {job_id} is not live in the scheduler's view")
    out = PlacementView(
        job_id=job.id, status=job.status.value, summary="", region=job.region,
        region_policy=effective_policy(job.region, job.region_policy), max_latency_ms=job.max_latency_ms,
    )
    if job.status is not JobStatus.QUEUED:
        out.worker_id = job.worker_id
        out.summary = f"{job.status.value} on worker {job.worker_id}"
        return out
    candidates = view.candidates().values()
    out.able_workers, out.reasons = explain(job, candidates, latencies)
    if out.able_workers:
        out.summary = (f"{out.able_workers} of {len(candidates)} workers can take it now: it is placed at the "
                       f"scheduler's next pass, in its turn among the queued jobs")
    elif not candidates:
        out.summary = "no worker is registered"
    else:
        top = out.reasons[0]
        out.summary = f"none of {len(candidates)} workers can take it now; most are {top.reason} ({top.workers})"
    return out


class PlacementQueries:
    """Answers `sched.placement` requests from a scheduler's view (`sdk.endpoints`)."""

    def __init__(
        self, nc: NatsClient, view: SchedulerView, latencies: Callable[[], LatencyTable], ready: Callable[[], bool]
    ) -> None:
        self._view = view
        self._latencies = latencies
        self._ready = ready
        self._endpoints = Endpoints(nc, queue=subjects.SCHED_QUEUE, name="scheduler")

    async def start(self) -> None:
        await self._endpoints.serve({subjects.SCHED_PLACEMENT: self._explain})

    async def stop(self) -> None:
        await self._endpoints.stop()

    async def _explain(self, msg: Msg) -> PlacementView:
        if not self._ready():
            raise Unavailable("the scheduler is still reading the streams; retry", {"retry_after_s": 1})
        req = decode(msg.data, ExplainPlacement)
        # Synchronous on purpose: the view must not change while one explanation reads it.
        return explain_job(self._view, req.id, self._latencies())
