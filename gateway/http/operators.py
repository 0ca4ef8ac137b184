"""HTTP routes for operators only: workers, their runtime configuration, API keys and worker credentials."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromQuery, JSONBody, PathParameter, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from gateway.http.openapi import errors
from gateway.http.params import OPERATOR, OPERATOR_ERRORS, AtTime, WorkerId, exact
from gateway.service import Gateway
from sdk.api import (
    KEY_ID_PATTERN,
    TOKEN_PATTERN,
    ApiKeyCreated,
    ApiKeyList,
    CreateApiKey,
    CreateEnrollment,
    EnrollmentCreated,
    ListWorkers,
    WorkerAction,
    WorkerConfig,
    WorkerConfigChanges,
    WorkerConfigView,
    WorkerPage,
    WorkerStatusName,
    WorkerView,
)

# --- Workers ---------------------------------------------------------------------------------------


@get("/api/v1/workers", summary="List workers", guards=OPERATOR, responses=OPERATOR_ERRORS)
async def list_workers(
    gateway: NamedDependency[Gateway],
    region: Annotated[str | None, QueryParameter(pattern=TOKEN_PATTERN)] = None,
    status: FromQuery[WorkerStatusName | None] = None,
    at_time: AtTime = None,
) -> WorkerPage:
    return await gateway.workers(ListWorkers(region=region, status=status, at_time=at_time))


@get("/api/v1/workers/{worker_id:str}", summary="One worker", guards=OPERATOR, responses=OPERATOR_ERRORS)
async def get_worker(worker_id: WorkerId, gateway: NamedDependency[Gateway]) -> WorkerView:
    return await gateway.worker(worker_id)


@get(
    "/api/v1/workers/{worker_id:str}/config", summary="A worker's runtime configuration", guards=OPERATOR,
    responses=OPERATOR_ERRORS,
)
async def get_worker_config(worker_id: WorkerId, gateway: NamedDependency[Gateway]) -> WorkerConfigView:
    return await gateway.get_config(worker_id)


@put(
    "/api/v1/workers/{worker_id:str}/config", summary="Change a worker's runtime configuration", guards=OPERATOR,
    responses={**OPERATOR_ERRORS, **errors(409, 413)},
)
async def put_worker_config(
    request: Request[Any, Any, Any],
    worker_id: WorkerId,
    data: JSONBody[WorkerConfigChanges],
    gateway: NamedDependency[Gateway],
) -> WorkerConfigView:
    return await gateway.set_config(worker_id, (await exact(request, WorkerConfigChanges)).changes())


@get(
    "/api/v1/config/defaults", summary="Runtime configuration every worker inherits", guards=OPERATOR,
    responses=errors(401, 403, 503),
)
async def get_config_defaults(gateway: NamedDependency[Gateway]) -> WorkerConfig:
    return msgspec.convert(await gateway.get_defaults(), WorkerConfig)


@put(
    "/api/v1/config/defaults", summary="Change the runtime configuration every worker inherits", guards=OPERATOR,
    responses=errors(400, 401, 403, 413, 503),
)
async def put_config_defaults(
    request: Request[Any, Any, Any], data: JSONBody[WorkerConfigChanges], gateway: NamedDependency[Gateway]
) -> WorkerConfig:
    changes = (await exact(request, WorkerConfigChanges)).changes()
    return msgspec.convert(await gateway.set_defaults(changes), WorkerConfig)


# --- Admin: API keys and worker credentials (operator only) --------------------------------------


@post(
    "/api/v1/admin/keys", status_code=HTTP_201_CREATED, guards=OPERATOR, summary="Create an API key (shown once)",
    responses=errors(400, 401, 403, 413, 503),
)
async def create_api_key(
    request: Request[Any, Any, Any], data: JSONBody[CreateApiKey], gateway: NamedDependency[Gateway]
) -> ApiKeyCreated:
    return await gateway.admin.create_api_key(await exact(request, CreateApiKey))


@get(
    "/api/v1/admin/keys", guards=OPERATOR, summary="List API keys (never their secrets)",
    responses=errors(401, 403, 503),
)
async def list_api_keys(gateway: NamedDependency[Gateway]) -> ApiKeyList:
    return await gateway.admin.list_api_keys()


@delete(
    "/api/v1/admin/keys/{key_id:str}", status_code=HTTP_204_NO_CONTENT, guards=OPERATOR, summary="Revoke an API key",
    responses=OPERATOR_ERRORS,
)
async def revoke_api_key(
    key_id: Annotated[str, PathParameter(pattern=KEY_ID_PATTERN, description="`key_id` of the key")],
    gateway: NamedDependency[Gateway],
) -> None:
    await gateway.admin.revoke_api_key(key_id)


@post(
    "/api/v1/admin/workers/enroll", status_code=HTTP_201_CREATED, guards=OPERATOR,
    summary="Create a one-use enrollment token for a worker (shown once)", responses=errors(400, 401, 403, 413, 503),
)
async def enroll_worker(
    request: Request[Any, Any, Any], data: JSONBody[CreateEnrollment], gateway: NamedDependency[Gateway]
) -> EnrollmentCreated:
    return await gateway.admin.create_enrollment(await exact(request, CreateEnrollment))


@post(
    "/api/v1/admin/workers/{worker_id:str}/rotate", status_code=HTTP_202_ACCEPTED, guards=OPERATOR,
    summary="Have a worker rotate its credentials at its next heartbeat", responses={**OPERATOR_ERRORS, **errors(409)},
)
async def rotate_worker(worker_id: WorkerId, gateway: NamedDependency[Gateway]) -> WorkerAction:
    return await gateway.admin.request_rotation(worker_id)


@post(
    "/api/v1/admin/workers/{worker_id:str}/revoke", status_code=HTTP_200_OK, guards=OPERATOR,
    summary="Revoke a worker's credentials at once; its jobs are requeued", responses={**OPERATOR_ERRORS, **errors(409)},
)
async def revoke_worker(worker_id: WorkerId, gateway: NamedDependency[Gateway]) -> WorkerAction:
    return await gateway.admin.revoke_worker(worker_id)


ROUTES = [
    list_workers, get_worker, get_worker_config, put_worker_config, get_config_defaults, put_config_defaults,
    create_api_key, list_api_keys, revoke_api_key, enroll_worker, rotate_worker, revoke_worker,
]
