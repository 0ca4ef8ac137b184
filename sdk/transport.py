"""How `sdk.client.Client` reaches the platform: one small interface, two transports.

Every operation is a `Route`: its NATS subject (`api.>`) and its HTTP method and path. A transport sends
a request struct along its half of the route and returns the reply as the given type, or raises the
typed error (`sdk.errors`). `NatsTransport` is here; `HttpTransport` is in `sdk.http`. A new operation
is a `Route` and one method of `Client`, for both transports at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from sdk import subjects
from sdk.api import JobView, StreamChunk, WaitJob
from sdk.auth import Headers, TokenSession
from sdk.connection import decode_reply, request
from sdk.errors import BadRequest, Timeout

T = TypeVar("T")


@dataclass(frozen=True)
class Route:
    """Where an operation lives. Over HTTP the request's fields fill the `{placeholders}` of `path`; the
    others travel as the body (`body`: the whole request, or the one field named) or as the query."""

    #: The NATS subject; None for an operation only the HTTP API offers (admin, defaults, health).
    subject: str | None
    method: str
    path: str
    body: str | None = None
    #: False for the routes that take no access token (tokens themselves, health).
    auth: bool = True


WHOLE = "*"  #: `Route.body`: the whole request is the body

ISSUE_TOKENS = Route(subjects.API_AUTH_TOKEN, "POST", "/api/v1/auth/token", WHOLE, auth=False)
REFRESH_TOKENS = Route(subjects.API_AUTH_REFRESH, "POST", "/api/v1/auth/refresh", WHOLE, auth=False)
SUBMIT = Route(subjects.API_JOBS_SUBMIT, "POST", "/api/v1/jobs", WHOLE)
GET_JOB = Route(subjects.API_JOBS_GET, "GET", "/api/v1/jobs/{id}")
LIST_JOBS = Route(subjects.API_JOBS_LIST, "GET", "/api/v1/jobs")
PLACEMENT = Route(subjects.API_JOBS_PLACEMENT, "GET", "/api/v1/jobs/{id}/placement")
CANCEL = Route(subjects.API_JOBS_CANCEL, "POST", "/api/v1/jobs/{id}/cancel")
EVENTS = Route(subjects.API_JOBS_EVENTS, "GET", "/api/v1/jobs/{id}/events")
WAIT = Route(subjects.API_JOBS_WAIT, "GET", "/api/v1/jobs/{id}/wait")
RESULT = Route(subjects.API_JOBS_RESULT, "GET", "/api/v1/jobs/{id}/result/{index}")
DIRECT_OPEN = Route(subjects.API_DIRECT_OPEN, "POST", "/api/v1/direct/sessions", WHOLE)
#: Over NATS a direct request goes to the worker itself (`sdk.sessions`); over HTTP the gateway relays it.
DIRECT_RUN = Route(None, "POST", "/api/v1/direct/sessions/{id}/run", "run")
DIRECT_CLOSE = Route(subjects.API_DIRECT_CLOSE, "DELETE", "/api/v1/direct/sessions/{id}")
LIST_WORKERS = Route(subjects.API_WORKERS_LIST, "GET", "/api/v1/workers")
GET_WORKER = Route(subjects.API_WORKERS_GET, "GET", "/api/v1/workers/{id}")
GET_WORKER_CONFIG = Route(subjects.API_WORKERS_CONFIG_GET, "GET", "/api/v1/workers/{id}/config")
SET_WORKER_CONFIG = Route(subjects.API_WORKERS_CONFIG_SET, "PUT", "/api/v1/workers/{id}/config", "changes")
SET_DEFAULTS = Route(None, "PUT", "/api/v1/config/defaults", WHOLE)
GET_REGIONS = Route(None, "GET", "/api/v1/config/regions")
SET_REGIONS = Route(None, "PUT", "/api/v1/config/regions", WHOLE)
GET_LIMITS = Route(None, "GET", "/api/v1/config/limits")
SET_LIMITS = Route(None, "PUT", "/api/v1/config/limits", WHOLE)
HEALTH = Route(None, "GET", "/health", auth=False)
METRICS = Route(None, "GET", "/metrics", auth=False)
CREATE_API_KEY = Route(None, "POST", "/api/v1/admin/keys", WHOLE)
LIST_API_KEYS = Route(None, "GET", "/api/v1/admin/keys")
REVOKE_API_KEY = Route(None, "DELETE", "/api/v1/admin/keys/{key_id}")
ENROLL = Route(None, "POST", "/api/v1/admin/workers/enroll", WHOLE)
ROTATE_WORKER = Route(None, "POST", "/api/v1/admin/workers/{worker_id}/rotate")
REVOKE_WORKER = Route(None, "POST", "/api/v1/admin/workers/{worker_id}/revoke")


class Transport(Protocol):
    async def call(
        self, route: Route, req: Any, reply_type: type[T], *, headers: Headers, timeout_s: float
    ) -> T:
        """Send `req` (a struct, or None) along `route`; the reply as `reply_type` (None: no reply)."""
        ...

    def stream(
        self, job_id: str, auth: TokenSession, timeout_s: float, finished: Callable[[], Awaitable[JobView]]
    ) -> AsyncIterator[str | JobView]:
        """A running job's text pieces, then the finished job (`finished` waits for it where needed)."""
        ...

    async def close(self) -> None: ...


class NatsTransport:
    """Request-reply on the gateway's `api.>` endpoints; a job's text from `api.jobs.stream`."""

    def __init__(self, nc: NatsClient, *, timeout_s: float = 10.0) -> None:
        self.nc = nc
        #: How long past a stream's own timeout its next message may take.
        self.timeout_s = timeout_s

    async def call(
        self, route: Route, req: Any, reply_type: type[T], *, headers: Headers, timeout_s: float
    ) -> T:
        if route.subject is None:
            raise BadRequest(f"{route.method} {route.path} is offered over HTTP only; use sdk.http.HttpClient")
        return await request(self.nc, route.subject, req, reply_type, timeout_s=timeout_s, headers=headers)

    async def stream(
        self, job_id: str, auth: TokenSession, timeout_s: float, finished: Callable[[], Awaitable[JobView]]
    ) -> AsyncIterator[str | JobView]:
        """The gateway sends the chunks to this client's inbox (`api.jobs.stream`), only those of the
        worker holding the job, then the job (`STREAM_END_HEADER`); an error reply ends it early."""
        messages: asyncio.Queue[Msg] = asyncio.Queue()
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=messages.put)
        body = msgspec.json.encode(WaitJob(id=job_id, timeout_s=timeout_s))
        wait_s = timeout_s + self.timeout_s

        async def first_message(headers: Headers) -> Msg:
            await self.nc.publish(subjects.API_JOBS_STREAM, body, reply=inbox, headers=headers)
            msg = await asyncio.wait_for(messages.get(), wait_s)
            decode_reply(msg, bytes)  # raises an error reply; an expired token is renewed and sent again
            return msg

        try:
            msg = await auth.call(first_message)
            while not (msg.headers or {}).get(subjects.STREAM_END_HEADER):
                yield decode_reply(msg, StreamChunk).text
                msg = await asyncio.wait_for(messages.get(), wait_s)
            yield decode_reply(msg, JobView)
        except TimeoutError:
            raise Timeout(f"job {job_id} is not finished after {timeout_s}s") from None
        finally:
            await sub.unsubscribe()

    async def close(self) -> None:
        await self.nc.drain()


def fields(req: Any) -> dict[str, Any]:
    """A request struct's fields by name (none for no request)."""
    return {} if req is None else msgspec.structs.asdict(req)
