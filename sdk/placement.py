"""Placement explanations: why a job runs where it runs, or why it waits (`GET /api/v1/jobs/{id}/placement`,
`api.jobs.placement`, `client.placement(job_id)`).

A placed job explains itself from the log: its `JobAssigned` names the worker, the region, the distance
and what won. A queued job is explained by the scheduler, from the view it places with (`sched.placement`):
per reason, how many workers give it, a sample of their ids, and what would change it.
"""

from __future__ import annotations

import msgspec

from sdk.api import Strict, Token


class ExplainPlacement(Strict):
    id: Token


class PlacementReason(msgspec.Struct, frozen=True, kw_only=True):
    #: Why these workers cannot take the job now, e.g. `busy 4/4` or `region us-east farther than
    #: max_latency_ms 100`.
    reason: str
    workers: int
    #: A few of their ids (at most 5), in id order.
    sample: list[str]
    #: What would let them take it.
    change: str


class PlacementView(msgspec.Struct, kw_only=True):
    job_id: str
    #: The job's status (`queued`, `assigned`, `running`, or how it ended).
    status: str
    #: One sentence for people.
    summary: str
    #: The job's region and policy as placement reads them (`any` without a region).
    region: str | None = None
    region_policy: str = "any"
    max_latency_ms: float | None = None
    #: The assignment (current or last): worker, its region, how far from the job's region (None when
    #: the job named none or the pair is unknown) and why it won.
    worker_id: str | None = None
    worker_region: str | None = None
    distance_ms: float | None = None
    rank: str | None = None
    #: A queued job: how many workers could take it now, and why the others cannot.
    able_workers: int | None = None
    reasons: list[PlacementReason] = []
