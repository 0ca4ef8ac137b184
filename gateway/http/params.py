"""What the HTTP handlers share: the gateway and the caller as dependencies, the operator guard, the
exact body decode, and the parameters as the OpenAPI document publishes them."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.handlers import BaseRouteHandler
from litestar.params import PathParameter, QueryParameter

from gateway.access import require_operator
from gateway.auth import Principal
from gateway.http.openapi import errors
from gateway.service import Gateway
from sdk import subjects
from sdk.api import MAX_SEQ, TOKEN_PATTERN
from sdk.errors import BadRequest
from sdk.history import RFC3339_PATTERN

T = TypeVar("T")


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
#: The routes that need no access token say so (an empty requirement overrides the document's default).
NO_AUTH: list[dict[str, list[str]]] = [{}]


async def exact(request: Request[Any, Any, Any], kind: type[T]) -> T:
    """The body as the document describes it. A handler's `data` parameter gives the document its
    schema, but litestar converts it laxly (`"5"` for 5, `0` for false), so the handler reads this
    instead: exact JSON types, where a number with no fraction (`4.0`) is an integer, as JSON Schema
    counts it (msgspec alone refuses it for an `int`)."""
    try:
        parsed = msgspec.json.decode(await request.body())
        return msgspec.convert(_integral(parsed), kind, strict=True)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRequest(str(exc)) from None


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_SEQ:
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral(item) for item in value]
    return value


JobId = Annotated[str, PathParameter(pattern=TOKEN_PATTERN, description="A job's id, as its submission returned it")]
WorkerId = Annotated[str, PathParameter(pattern=TOKEN_PATTERN, description="A worker's id")]
MinSeq = Annotated[
    int,
    QueryParameter(
        ge=0, le=MAX_SEQ,
        description="Read after this JOBS sequence (a write's `seq`; 0: no wait): waits while the read model "
        "catches up (503 after a few seconds); 400 at once beyond the end of the log",
    ),
]

AtSeq = Annotated[
    int | None,
    QueryParameter(
        ge=0, le=MAX_SEQ,
        description="Time travel: as it was at this JOBS sequence, folded from the log (400 beyond its end)",
    ),
]
AtTime = Annotated[
    str | None,
    QueryParameter(
        max_length=64, pattern=RFC3339_PATTERN,
        description="Time travel: as it was at this moment (RFC 3339, e.g. 2026-11-30T03:00:00Z), folded from "
        "the log; not with `at_seq`",
    ),
]

#: A job route answers these besides its success (a client's token sees only its own jobs: 404).
JOB_ERRORS = errors(400, 401, 404, 503)
OPERATOR_ERRORS = errors(400, 401, 403, 404, 503)
