"""HTTP routes of tokens and jobs: a client's (or an operator's) access token; a client sees its own jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import FromQuery, JSONBody, PathParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_202_ACCEPTED

from gateway.access import job_scope, require_client
from gateway.auth import Principal
from gateway.http.openapi import errors
from gateway.http.params import JOB_ERRORS, NO_AUTH, AtSeq, AtTime, JobId, MinSeq, exact
from gateway.jobs import MAX_WAIT_S
from gateway.service import Gateway
from sdk.api import (
    CURSOR_PATTERN,
    TOKEN_PATTERN,
    CancelAccepted,
    CancelJob,
    GetJob,
    GetResult,
    IssueTokens,
    JobEvents,
    JobPage,
    JobType,
    JobView,
    ListJobs,
    RefreshTokens,
    SubmitJob,
    Submitted,
    TokenPair,
)
from sdk.errors import PlatformError, Timeout
from sdk.jobs import JobStatus

_json = msgspec.json.Encoder()

# --- Tokens ----------------------------------------------------------------------------------------


@post(
    "/api/v1/auth/token", status_code=HTTP_200_OK, security=NO_AUTH, responses=errors(400, 401, 413, 503),
    summary="Exchange an API key for access and refresh tokens",
)
async def issue_tokens(
    request: Request[Any, Any, Any], data: JSONBody[IssueTokens], gateway: NamedDependency[Gateway]
) -> TokenPair:
    return await gateway.issue_tokens(await exact(request, IssueTokens))


@post(
    "/api/v1/auth/refresh", status_code=HTTP_200_OK, security=NO_AUTH, responses=errors(400, 401, 409, 413, 503),
    summary="Rotate a token pair (the refresh token is spent)",
)
async def refresh_tokens(
    request: Request[Any, Any, Any], data: JSONBody[RefreshTokens], gateway: NamedDependency[Gateway]
) -> TokenPair:
    return await gateway.refresh_tokens(await exact(request, RefreshTokens))


# --- Jobs ------------------------------------------------------------------------------------------


@post(
    "/api/v1/jobs", status_code=HTTP_201_CREATED, summary="Submit a job",
    responses={
        HTTP_200_OK: ResponseSpec(Submitted, description="An earlier submission with this idempotency key"),
        **errors(400, 401, 403, 413, 429, 503),
    },
)
async def submit_job(
    request: Request[Any, Any, Any],
    data: JSONBody[SubmitJob],
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
) -> Response[Submitted]:
    job = await exact(request, SubmitJob)
    submitted = await gateway.submit(job, require_client(principal).subject)  # owned by its API key
    return Response(submitted, status_code=HTTP_201_CREATED if submitted.created else HTTP_200_OK)


@get("/api/v1/jobs/{job_id:str}", summary="A job's current view, or a past one", responses=JOB_ERRORS)
async def get_job(
    job_id: JobId,
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
    min_seq: MinSeq = 0,
    at_seq: AtSeq = None,
    at_time: AtTime = None,
) -> JobView:
    req = GetJob(id=job_id, min_seq=min_seq, at_seq=at_seq, at_time=at_time)
    return await gateway.get(req, job_scope(principal))


@get("/api/v1/jobs", summary="List jobs, newest first", responses=errors(400, 401, 503))
async def list_jobs(
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
    status: FromQuery[JobStatus | None] = None,
    job_type: Annotated[JobType | None, QueryParameter(name="type")] = None,
    worker_id: Annotated[str | None, QueryParameter(pattern=TOKEN_PATTERN)] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
    cursor: Annotated[
        str | None, QueryParameter(pattern=CURSOR_PATTERN, description="`next_cursor` of the page before")
    ] = None,
    min_seq: MinSeq = 0,
    at_seq: AtSeq = None,
    at_time: AtTime = None,
) -> JobPage:
    req = ListJobs(
        status=status.value if status else None, type=job_type, worker_id=worker_id, limit=limit, cursor=cursor,
        min_seq=min_seq, at_seq=at_seq, at_time=at_time,
    )
    return await gateway.list(req, job_scope(principal))


@post(
    "/api/v1/jobs/{job_id:str}/cancel", status_code=HTTP_202_ACCEPTED, summary="Cancel a job",
    responses=errors(400, 401, 404, 409, 503),
)
async def cancel_job(
    job_id: JobId,
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
    reason: Annotated[str | None, QueryParameter(max_length=500)] = None,
) -> CancelAccepted:
    return await gateway.cancel(CancelJob(id=job_id, reason=reason), job_scope(principal))


@get("/api/v1/jobs/{job_id:str}/events", summary="A job's history, oldest first", responses=JOB_ERRORS)
async def job_events(job_id: JobId, gateway: NamedDependency[Gateway], principal: NamedDependency[Principal]) -> JobEvents:
    return await gateway.events(job_id, job_scope(principal))


@get(
    "/api/v1/jobs/{job_id:str}/wait", summary="Wait until a job is finished",
    responses={
        HTTP_202_ACCEPTED: ResponseSpec(JobView, description="Not finished within `timeout_s`: the job as it is now"),
        **JOB_ERRORS,
    },
)
async def wait_job(
    job_id: JobId,
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
    timeout_s: Annotated[float, QueryParameter(gt=0, le=MAX_WAIT_S)] = 60.0,
) -> Response[JobView]:
    """200 with the finished job; 202 with the job as it is when `timeout_s` ran out first (the answer
    the caller asked for, not a failure of the server, so not a 5xx)."""
    try:
        return Response(await gateway.wait(job_id, timeout_s, job_scope(principal)), status_code=HTTP_200_OK)
    except Timeout:
        job = await gateway.get(GetJob(id=job_id), job_scope(principal))
        return Response(job, status_code=HTTP_202_ACCEPTED)


@get(
    "/api/v1/jobs/{job_id:str}/stream", summary="An LLM job's text as server-sent events",
    media_type="text/event-stream", responses=JOB_ERRORS,
)
async def stream_job(job_id: JobId, gateway: NamedDependency[Gateway], principal: NamedDependency[Principal]) -> ServerSentEvent:
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


@get(
    "/api/v1/jobs/{job_id:str}/result/{index:int}", summary="A stored result of a job (an image)",
    media_type="application/octet-stream", responses=JOB_ERRORS,
)
async def job_result(
    job_id: JobId,
    index: Annotated[int, PathParameter(ge=0, le=63)],
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
) -> Response[bytes]:
    data, content_type = await gateway.result(GetResult(id=job_id, index=index), job_scope(principal))
    return Response(data, media_type=content_type)


ROUTES = [
    issue_tokens, refresh_tokens,
    submit_job, get_job, list_jobs, cancel_job, job_events, wait_job, stream_job, job_result,
]
