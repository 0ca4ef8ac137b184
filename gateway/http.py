"""The HTTP API (litestar). Handlers are thin: validate (msgspec, through litestar), call the gateway
service, return its struct. Errors map to statuses in one place (`sdk.errors.HTTP_STATUS`).

Authentication: every route but `/health`, `/schema` and `/api/v1/auth/*` needs
`Authorization: Bearer <access token>`. Job routes take the caller as the `principal` dependency (a
client sees its own jobs, an operator every job); worker, config and admin routes are guarded by
`operator_only` (401 without a valid token, 403 for a client's).

OpenAPI: `/schema/openapi.json`, interactive docs at `/schema`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request, Response, delete, get, post, put
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import BaseRouteHandler
from litestar.logging import LoggingConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import FromPath, FromQuery, JSONBody, PathParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_201_CREATED,
    HTTP_202_ACCEPTED,
    HTTP_204_NO_CONTENT,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from nats.errors import ConnectionClosedError, NoServersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeoutError

from gateway.access import job_scope, require_client, require_operator
from gateway.auth import AuthSettings, Credentials, Principal, load_or_create_master_key
from gateway.auth.master_key import MASTER_KEY_FILE
from gateway.jobs import MAX_WAIT_S
from gateway.nats_api import NatsApi
from gateway.service import Gateway
from sdk import subjects
from sdk.api import (
    MAX_BODY_BYTES,
    ApiKeyCreated,
    ApiKeyList,
    CancelAccepted,
    CancelJob,
    CreateApiKey,
    CreateEnrollment,
    EnrollmentCreated,
    GetJob,
    GetResult,
    IssueTokens,
    JobEvents,
    JobPage,
    JobView,
    ListJobs,
    ListWorkers,
    RefreshTokens,
    SubmitJob,
    Submitted,
    TokenPair,
    WorkerAction,
    WorkerConfigView,
    WorkerPage,
    WorkerView,
)
from sdk.connection import connect
from sdk.errors import HTTP_STATUS, PlatformError
from sdk.log import ensure_streams

logger = logging.getLogger(__name__)
_json = msgspec.json.Encoder()

NATS_DOWN = (ConnectionClosedError, NoServersError, OutboundBufferLimitError, NatsTimeoutError)


async def provide_gateway(state: State) -> Gateway:
    return state.gateway


async def provide_principal(request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]) -> Principal:
    """The caller, from its access token; `Unauthorized` (401, with the reason) without a valid one."""
    return gateway.authenticate(request.headers.get(subjects.AUTH_HEADER))


async def operator_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: 401 without a valid access token, 403 unless it is an operator's."""
    gateway: Gateway = connection.app.state.gateway
    require_operator(gateway.authenticate(connection.headers.get(subjects.AUTH_HEADER)))


OPERATOR = [operator_only]

# --- Tokens ----------------------------------------------------------------------------------------


@post("/api/v1/auth/token", status_code=HTTP_200_OK, summary="Exchange an API key for access and refresh tokens")
async def issue_tokens(data: JSONBody[IssueTokens], gateway: NamedDependency[Gateway]) -> TokenPair:
    return await gateway.issue_tokens(data)


@post("/api/v1/auth/refresh", status_code=HTTP_200_OK, summary="Rotate a token pair (the refresh token is spent)")
async def refresh_tokens(data: JSONBody[RefreshTokens], gateway: NamedDependency[Gateway]) -> TokenPair:
    return await gateway.refresh_tokens(data)


# --- Jobs ------------------------------------------------------------------------------------------


@post("/api/v1/jobs", status_code=HTTP_201_CREATED, summary="Submit a job")
async def submit_job(
    data: JSONBody[SubmitJob], gateway: NamedDependency[Gateway], principal: NamedDependency[Principal]
) -> Response[Submitted]:
    submitted = await gateway.submit(data, require_client(principal).subject)  # owned by its API key
    return Response(submitted, status_code=HTTP_201_CREATED if submitted.created else HTTP_200_OK)


@get("/api/v1/jobs/{job_id:str}", summary="A job's current view")
async def get_job(
    job_id: FromPath[str],
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
    min_seq: Annotated[int | None, QueryParameter(ge=0)] = None,
) -> JobView:
    return await gateway.get(GetJob(id=job_id, min_seq=min_seq), job_scope(principal))


@get("/api/v1/jobs", summary="List jobs, newest first")
async def list_jobs(
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
    status: FromQuery[str | None] = None,
    job_type: Annotated[str | None, QueryParameter(name="type")] = None,
    worker_id: FromQuery[str | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
    cursor: FromQuery[str | None] = None,
    min_seq: Annotated[int | None, QueryParameter(ge=0)] = None,
) -> JobPage:
    req = ListJobs(status=status, type=job_type, worker_id=worker_id, limit=limit, cursor=cursor, min_seq=min_seq)
    return await gateway.list(req, job_scope(principal))


@post("/api/v1/jobs/{job_id:str}/cancel", status_code=HTTP_202_ACCEPTED, summary="Cancel a job")
async def cancel_job(
    job_id: FromPath[str],
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
    reason: Annotated[str | None, QueryParameter(max_length=500)] = None,
) -> CancelAccepted:
    return await gateway.cancel(CancelJob(id=job_id, reason=reason), job_scope(principal))


@get("/api/v1/jobs/{job_id:str}/events", summary="A job's history, oldest first")
async def job_events(
    job_id: FromPath[str], gateway: NamedDependency[Gateway], principal: NamedDependency[Principal]
) -> JobEvents:
    return await gateway.events(job_id, job_scope(principal))


@get("/api/v1/jobs/{job_id:str}/wait", summary="Wait until a job is finished")
async def wait_job(
    job_id: FromPath[str],
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
    timeout_s: Annotated[float, QueryParameter(gt=0, le=MAX_WAIT_S)] = 60.0,
) -> JobView:
    return await gateway.wait(job_id, timeout_s, job_scope(principal))


@get("/api/v1/jobs/{job_id:str}/stream", summary="An LLM job's text as server-sent events")
async def stream_job(
    job_id: FromPath[str], gateway: NamedDependency[Gateway], principal: NamedDependency[Principal]
) -> ServerSentEvent:
    """`token` events (JSON strings) whose texts add up to the final text, also for a client that
    connects late; then one `done` event with the finished job, or one `error` event (`{code, message,
    details}`, e.g. `unavailable` when the gateway shuts down)."""
    pieces = await gateway.stream(job_id, job_scope(principal))

    async def events() -> AsyncIterator[ServerSentEventMessage]:
        try:
            async for item in pieces:
                if isinstance(item, str):
                    yield ServerSentEventMessage(event="token", data=_json.encode(item).decode())
                else:
                    yield ServerSentEventMessage(event="done", data=_json.encode(item).decode())
        except PlatformError as exc:
            yield ServerSentEventMessage(event="error", data=_json.encode(exc.to_reply()).decode())

    return ServerSentEvent(events())


@get("/api/v1/jobs/{job_id:str}/result/{index:int}", summary="A stored result of a job (an image)")
async def job_result(
    job_id: FromPath[str],
    index: Annotated[int, PathParameter(ge=0, le=63)],
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
) -> Response[bytes]:
    data, content_type = await gateway.result(GetResult(id=job_id, index=index), job_scope(principal))
    return Response(data, media_type=content_type)


# --- Workers ---------------------------------------------------------------------------------------


@get("/api/v1/workers", summary="List workers", guards=OPERATOR)
async def list_workers(
    gateway: NamedDependency[Gateway], region: FromQuery[str | None] = None, status: FromQuery[str | None] = None
) -> WorkerPage:
    return await gateway.workers(ListWorkers(region=region, status=status))


@get("/api/v1/workers/{worker_id:str}", summary="One worker", guards=OPERATOR)
async def get_worker(worker_id: FromPath[str], gateway: NamedDependency[Gateway]) -> WorkerView:
    return await gateway.worker(worker_id)


@get("/api/v1/workers/{worker_id:str}/config", summary="A worker's runtime configuration", guards=OPERATOR)
async def get_worker_config(worker_id: FromPath[str], gateway: NamedDependency[Gateway]) -> WorkerConfigView:
    return await gateway.get_config(worker_id)


@put("/api/v1/workers/{worker_id:str}/config", summary="Change a worker's runtime configuration", guards=OPERATOR)
async def put_worker_config(
    worker_id: FromPath[str], data: JSONBody[dict[str, Any]], gateway: NamedDependency[Gateway]
) -> WorkerConfigView:
    return await gateway.set_config(worker_id, data)


@get("/api/v1/config/defaults", summary="Runtime configuration every worker inherits", guards=OPERATOR)
async def get_config_defaults(gateway: NamedDependency[Gateway]) -> dict[str, Any]:
    return await gateway.get_defaults()


@put("/api/v1/config/defaults", summary="Change the runtime configuration every worker inherits", guards=OPERATOR)
async def put_config_defaults(data: JSONBody[dict[str, Any]], gateway: NamedDependency[Gateway]) -> dict[str, Any]:
    return await gateway.set_defaults(data)


# --- Admin: API keys and worker credentials (operator only) --------------------------------------


@post("/api/v1/admin/keys", status_code=HTTP_201_CREATED, guards=OPERATOR, summary="Create an API key (shown once)")
async def create_api_key(data: JSONBody[CreateApiKey], gateway: NamedDependency[Gateway]) -> ApiKeyCreated:
    return await gateway.admin.create_api_key(data)


@get("/api/v1/admin/keys", guards=OPERATOR, summary="List API keys (never their secrets)")
async def list_api_keys(gateway: NamedDependency[Gateway]) -> ApiKeyList:
    return await gateway.admin.list_api_keys()


@delete(
    "/api/v1/admin/keys/{key_id:str}", status_code=HTTP_204_NO_CONTENT, guards=OPERATOR, summary="Revoke an API key"
)
async def revoke_api_key(key_id: FromPath[str], gateway: NamedDependency[Gateway]) -> None:
    await gateway.admin.revoke_api_key(key_id)


@post(
    "/api/v1/admin/workers/enroll", status_code=HTTP_201_CREATED, guards=OPERATOR,
    summary="Create a one-use enrollment token for a worker (shown once)",
)
async def enroll_worker(data: JSONBody[CreateEnrollment], gateway: NamedDependency[Gateway]) -> EnrollmentCreated:
    return await gateway.admin.create_enrollment(data)


@post(
    "/api/v1/admin/workers/{worker_id:str}/rotate", status_code=HTTP_202_ACCEPTED, guards=OPERATOR,
    summary="Have a worker rotate its credentials at its next heartbeat",
)
async def rotate_worker(worker_id: FromPath[str], gateway: NamedDependency[Gateway]) -> WorkerAction:
    return await gateway.admin.request_rotation(worker_id)


@post(
    "/api/v1/admin/workers/{worker_id:str}/revoke", status_code=HTTP_200_OK, guards=OPERATOR,
    summary="Revoke a worker's credentials at once; its jobs are requeued",
)
async def revoke_worker(worker_id: FromPath[str], gateway: NamedDependency[Gateway]) -> WorkerAction:
    return await gateway.admin.revoke_worker(worker_id)


# --- Health ----------------------------------------------------------------------------------------


@get("/health", summary="Each dependency's state; 503 while NATS is unreachable")
async def health(gateway: NamedDependency[Gateway]) -> Response[dict[str, str]]:
    state = await gateway.health()
    if all(value == "ok" for value in state.values()):
        return Response({"status": "ok", **state}, status_code=HTTP_200_OK)
    down = ", ".join(name for name, value in state.items() if value != "ok")
    body = {"status": "unavailable", **state, "code": "unavailable", "message": f"unreachable: {down}"}
    return Response(body, status_code=HTTP_503_SERVICE_UNAVAILABLE)


# --- Errors ----------------------------------------------------------------------------------------


def _error(status: int, code: str, message: str, details: Any = None) -> Response[dict[str, Any]]:
    return Response({"code": code, "message": message, "details": details}, status_code=status)


def platform_error(_: Request, exc: PlatformError) -> Response[dict[str, Any]]:
    response = _error(HTTP_STATUS.get(exc.code, 500), exc.code, exc.message, exc.details)
    if exc.details and "retry_after_s" in exc.details:  # e.g. a long poll cut short by a shutdown
        response.headers["Retry-After"] = str(exc.details["retry_after_s"])
    return response


def validation_error(_: Request, exc: ValidationException) -> Response[dict[str, Any]]:
    return _error(400, "bad_request", str(exc.detail), exc.extra)


def http_error(_: Request, exc: HTTPException) -> Response[dict[str, Any]]:
    code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "bad_request")
    return _error(exc.status_code, code, str(exc.detail), exc.extra or None)


def nats_down(_: Request, exc: Exception) -> Response[dict[str, Any]]:
    return _error(503, "unavailable", f"NATS is unreachable: {type(exc).__name__}")


# --- App -------------------------------------------------------------------------------------------


def create_app(
    nats_url: str | None = None,
    *,
    secrets_dir: Path = Path(".data/secrets"),
    settings: AuthSettings = AuthSettings(),
    serve_nats_api: bool = True,
) -> Litestar:
    """The HTTP app; its lifespan connects to NATS, opens the credentials (master key in `secrets_dir`,
    created there on first run) and, by default, also serves the `api.>` endpoints."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        master_key = load_or_create_master_key(secrets_dir / MASTER_KEY_FILE)
        nc = await connect(nats_url, name="gateway")
        await ensure_streams(nc.jetstream())
        credentials = await Credentials.open(nc.jetstream(), master_key, settings=settings)
        gateway = Gateway(nc, credentials)
        await gateway.start()
        api = NatsApi(gateway)
        if serve_nats_api:
            await api.start()
        app.state.gateway = gateway
        try:
            yield
        finally:
            await api.stop()
            await gateway.stop()
            await credentials.close()
            await nc.drain()

    return Litestar(
        route_handlers=[
            issue_tokens, refresh_tokens,
            submit_job, get_job, list_jobs, cancel_job, job_events, wait_job, stream_job, job_result,
            list_workers, get_worker, get_worker_config, put_worker_config, get_config_defaults,
            put_config_defaults,
            create_api_key, list_api_keys, revoke_api_key, enroll_worker, rotate_worker, revoke_worker,
            health,
        ],
        dependencies={"gateway": Provide(provide_gateway), "principal": Provide(provide_principal)},
        lifespan=[lifespan],
        exception_handlers={
            PlatformError: platform_error,
            ValidationException: validation_error,
            HTTPException: http_error,
            **{cls: nats_down for cls in NATS_DOWN},
        },
        openapi_config=OpenAPIConfig(
            title="gpu-fabric",
            version="0.1.0",
            path="/schema",
            components=Components(
                security_schemes={"AccessToken": SecurityScheme(type="http", scheme="bearer")}
            ),
            security=[{"AccessToken": []}],
        ),
        request_max_body_size=MAX_BODY_BYTES,
        # Log through the process's own setup (gpuctl's, or a test's capture) instead of replacing the
        # root logger's handlers, as litestar does by default; unexpected errors are logged too.
        logging_config=LoggingConfig(
            configure_root_logger=False,
            loggers={"litestar": {"level": "INFO", "propagate": True}},
            log_exceptions="always",
        ),
    )
