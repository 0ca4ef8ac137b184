"""Regions and placement: the operator's latency table and queue limits (`platform-config` bucket), and
the explanation of where a job runs or why it waits.

A placed job explains itself from the log (its `JobAssigned`); a queued one is explained by the
scheduler from the view it places with (`sched.placement`, `scheduler.explain`). A settings change is
refused whole (400, nothing written) when any part of it is malformed.
"""

from __future__ import annotations

import logging
from typing import TypeVar

import msgspec
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from gateway.kv import Bucket
from sdk import subjects
from sdk.connection import request
from sdk.errors import JobNotFound
from sdk.events import JobAssigned
from sdk.jobs import JobStatus, fold, visible_to
from sdk.log import read_job_events
from sdk.placement import ExplainPlacement, PlacementView
from sdk.platform_config import QueueLimits
from sdk.regions import RegionLatencies, describe_ms, effective_policy, validate_latencies

logger = logging.getLogger(__name__)

#: How long the gateway waits for a scheduler's explanation.
EXPLAIN_TIMEOUT_S = 5.0

S = TypeVar("S", bound=msgspec.Struct)


class GeoCommands:
    """The gateway's region, limits and placement commands and queries (a part of `gateway.service.Gateway`)."""

    nc: NatsClient
    js: JetStreamContext
    #: The `platform-config` bucket, opened at start.
    platform_config: Bucket

    async def get_regions(self) -> RegionLatencies:
        return await self._setting(subjects.REGIONS_KEY, RegionLatencies)

    async def set_regions(self, latencies: RegionLatencies) -> RegionLatencies:
        """Replace the latency table; `BadRequest` (nothing written) when a pair makes no sense."""
        validate_latencies(latencies)
        await self.platform_config.write(subjects.REGIONS_KEY, latencies)
        logger.info("region latencies changed: %d regions", len(validate_latencies(latencies).regions))
        return latencies

    async def get_limits(self) -> QueueLimits:
        return await self._setting(subjects.LIMITS_KEY, QueueLimits)

    async def set_limits(self, limits: QueueLimits) -> QueueLimits:
        """Replace the queue limits (a limit left out, or null, is no limit)."""
        await self.platform_config.write(subjects.LIMITS_KEY, limits)
        logger.info("queue limits changed: %s", msgspec.to_builtins(limits))
        return limits

    async def _setting(self, key: str, kind: type[S]) -> S:
        loaded = await self.platform_config.load(key, lambda data: msgspec.json.decode(data or b"{}", type=kind))
        return kind() if loaded is None else loaded.value

    async def placement(self, job_id: str, owner: str | None = None) -> PlacementView:
        """Where the job runs (ran) and why that worker won, or why it is not placed yet."""
        records = await read_job_events(self.js, job_id)
        job = fold(records)
        if job is None or not visible_to(job, owner):
            raise JobNotFound(f"job {job_id} not found")
        if job.status is JobStatus.QUEUED:
            try:
                return await request(
                    self.nc, subjects.SCHED_PLACEMENT, ExplainPlacement(id=job_id), PlacementView,
                    timeout_s=EXPLAIN_TIMEOUT_S,
                )
            except JobNotFound:
                pass  # submitted a moment ago: the scheduler has not read it yet
        view = PlacementView(
            job_id=job.id, status=job.status.value, summary="", region=job.region,
            region_policy=effective_policy(job.region, job.region_policy), max_latency_ms=job.max_latency_ms,
        )
        assigned = [event for event, _ in records if isinstance(event, JobAssigned)]
        if job.status is JobStatus.QUEUED:
            view.summary = "just submitted: the scheduler has not read it yet"
        elif not assigned:
            view.summary = f"{job.status.value} without being placed"
        else:
            last = assigned[-1]
            view.worker_id, view.worker_region = last.worker_id, last.region
            view.distance_ms, view.rank = last.distance_ms, last.rank
            where = f"worker {last.worker_id} in region {last.region}"
            if job.region is not None:
                distance = describe_ms(last.distance_ms) if last.distance_ms is not None else "unknown distance"
                where += f", {distance} from {job.region}"
            view.summary = f"{job.status.value}; placed on {where} (attempt {last.attempt})"
        return view
