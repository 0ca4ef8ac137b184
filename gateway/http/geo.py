"""HTTP routes of regions, queue limits and placement explanations (`gateway.geo`, `gateway.backpressure`).

The config routes are an operator's; a job's placement is visible to its owner and to operators, like
the job itself.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, get, put
from litestar.di import NamedDependency
from litestar.params import JSONBody

from gateway.access import job_scope
from gateway.auth import Principal
from gateway.http.openapi import errors
from gateway.http.params import JOB_ERRORS, OPERATOR, JobId, exact
from gateway.service import Gateway
from sdk.placement import PlacementView
from sdk.platform_config import QueueLimits
from sdk.regions import RegionLatencies

CONFIG_ERRORS = errors(401, 403, 503)


@get(
    "/api/v1/jobs/{job_id:str}/placement", summary="Where a job runs and why, or why it is not placed yet",
    responses=JOB_ERRORS,
)
async def job_placement(
    job_id: JobId, gateway: NamedDependency[Gateway], principal: NamedDependency[Principal]
) -> PlacementView:
    return await gateway.placement(job_id, job_scope(principal))


@get(
    "/api/v1/config/regions", summary="The latency between regions, as placement reads it", guards=OPERATOR,
    responses=CONFIG_ERRORS,
)
async def get_regions(gateway: NamedDependency[Gateway]) -> RegionLatencies:
    return await gateway.get_regions()


@put(
    "/api/v1/config/regions", guards=OPERATOR, responses={**CONFIG_ERRORS, **errors(400, 413)},
    summary="Replace the latency table (a pair given once counts both ways; refused whole when malformed)",
)
async def put_regions(
    request: Request[Any, Any, Any], data: JSONBody[RegionLatencies], gateway: NamedDependency[Gateway]
) -> RegionLatencies:
    return await gateway.set_regions(await exact(request, RegionLatencies))


@get(
    "/api/v1/config/limits", summary="The queue limits past which submissions are refused (429)",
    guards=OPERATOR, responses=CONFIG_ERRORS,
)
async def get_limits(gateway: NamedDependency[Gateway]) -> QueueLimits:
    return await gateway.get_limits()


@put(
    "/api/v1/config/limits", summary="Replace the queue limits (null or left out: no limit)", guards=OPERATOR,
    responses={**CONFIG_ERRORS, **errors(400, 413)},
)
async def put_limits(
    request: Request[Any, Any, Any], data: JSONBody[QueueLimits], gateway: NamedDependency[Gateway]
) -> QueueLimits:
    return await gateway.set_limits(await exact(request, QueueLimits))


ROUTES = [job_placement, get_regions, put_regions, get_limits, put_limits]
