"""HTTP routes of direct sessions (`gateway.direct`): open, relay a request, close. A session is its
owner's: another client's reads as not found; an operator may close any."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, delete, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, PathParameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from gateway.access import job_scope, require_client
from gateway.auth import Principal
from gateway.http.openapi import errors
from gateway.http.params import exact
from gateway.service import Gateway
from sdk.api import TOKEN_PATTERN
from sdk.direct import DirectResult, DirectSessionView, OpenSession, RunDirect, SessionClosedView

SessionId = Annotated[str, PathParameter(pattern=TOKEN_PATTERN, description="A direct session's id")]


@post(
    "/api/v1/direct/sessions", status_code=HTTP_201_CREATED, responses=errors(400, 401, 403, 409, 413, 503),
    summary="Lease a warm worker's slot for direct requests (its subject and a session token)",
)
async def open_session(
    request: Request[Any, Any, Any],
    data: JSONBody[OpenSession],
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
) -> DirectSessionView:
    req = await exact(request, OpenSession)
    return await gateway.open_session(req, require_client(principal).subject)


@post(
    "/api/v1/direct/sessions/{session_id:str}/run", status_code=HTTP_200_OK,
    responses=errors(400, 401, 403, 404, 410, 413, 503, 504),
    summary="Relay one request to the session's worker (no scheduler, nothing appended)",
)
async def run_direct(
    session_id: SessionId,
    request: Request[Any, Any, Any],
    data: JSONBody[RunDirect],
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
) -> DirectResult:
    req = await exact(request, RunDirect)
    return await gateway.run_direct(session_id, req.params, job_scope(principal))


@delete(
    "/api/v1/direct/sessions/{session_id:str}", status_code=HTTP_200_OK, responses=errors(400, 401, 403, 404, 503),
    summary="Close a direct session (its owner or an operator): its slot is freed, its usage logged",
)
async def close_session(
    session_id: SessionId, gateway: NamedDependency[Gateway], principal: NamedDependency[Principal]
) -> SessionClosedView:
    return await gateway.close_session(session_id, job_scope(principal), principal.subject)


ROUTES = [open_session, run_direct, close_session]
