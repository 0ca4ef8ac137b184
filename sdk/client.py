"""The Python SDK: one `Client`, over NATS request-reply (`Client.connect`) or the HTTP gateway
(`sdk.http.HttpClient`). Each method is written once, over a transport (`sdk.transport`): the same
methods, the same typed structs and the same typed errors on both.

    async with await Client.connect("nats://127.0.0.1:4222", api_key="gfk_...") as client:
        job = await client.submit("echo", params={"hello": "world"})
        done = await client.wait(job.id)
        print(done.status, done.result)

It takes an API key (default: `$GF_API_KEY`) and handles its tokens itself (`sdk.auth`). Over NATS the
key is also the connection's identity (`sdk.bus`): a client reaches the job API and its own inboxes
only; an operator's key also the worker and config queries. The admin calls, the defaults, regions,
limits, health and metrics are offered over HTTP only.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client as NatsClient

from sdk import bus
from sdk import transport as routes
from sdk.api import (
    ApiKeyCreated,
    ApiKeyInfo,
    ApiKeyList,
    ApiKeyRole,
    CancelAccepted,
    CancelJob,
    CreateApiKey,
    CreateEnrollment,
    EnrollmentCreated,
    EventRecord,
    GetJob,
    GetResult,
    GetWorker,
    GetWorkerConfig,
    IssueTokens,
    JobEvents,
    JobEventsRequest,
    JobPage,
    JobView,
    ListJobs,
    ListWorkers,
    RefreshTokens,
    RegionPolicy,
    SetWorkerConfig,
    SubmitJob,
    Submitted,
    TokenPair,
    WaitJob,
    WorkerAction,
    WorkerConfigView,
    WorkerPage,
    WorkerView,
)
from sdk.auth import API_KEY_ENV, Headers, TokenSession
from sdk.connection import connect, nats_url_from_env
from sdk.direct import DEFAULT_TTL_S, OpenSession, SessionClosedView, SessionRef
from sdk.errors import BadRequest, JobError, Timeout
from sdk.jobs import JobStatus
from sdk.placement import ExplainPlacement, PlacementView
from sdk.platform_config import QueueLimits
from sdk.regions import RegionLatencies
from sdk.sessions import DirectSession
from sdk.transport import NatsTransport, Route, Transport

#: A moment to travel to: an aware datetime, or RFC 3339 text as it is.
When = dt.datetime | str

#: The gateway answers a wait within this long; longer waits are several requests.
WAIT_SLICE_S = 60.0

T = TypeVar("T")


class Client:
    def __init__(
        self,
        transport: Transport | NatsClient,
        *,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        region: str | None = None,
    ) -> None:
        """`transport`: an `sdk.transport.Transport`, or a connected NATS client to request over."""
        if isinstance(transport, NatsClient):
            transport = NatsTransport(transport, timeout_s=timeout_s)
        self.transport: Transport = transport
        self.timeout_s = timeout_s
        #: The region a job runs near when `submit` names none.
        self.region = region
        self.auth = TokenSession(api_key, issue=self._issue, refresh=self._refresh)

    @classmethod
    async def connect(
        cls, url: str | None = None, *, api_key: str | None = None, timeout_s: float = 10.0,
        region: str | None = None, **options: Any,
    ) -> Client:
        """Connect to NATS: as the client the API key (argument or `$GF_API_KEY`) proves (`sdk.bus`), or as
        the user `url` names (operator tools, as `platform`). `tls=` takes an `ssl.SSLContext`; `region` is
        where this client's jobs run nearest unless `submit` says otherwise."""
        api_key = api_key or os.environ.get(API_KEY_ENV) or None
        if api_key is not None and bus.identity_needed(nats_url_from_env(url)):
            options = {**bus.client_options(api_key), **options}
        nc = await connect(url, name="sdk-client", **options)
        return cls(nc, api_key=api_key, timeout_s=timeout_s, region=region)

    @property
    def nc(self) -> NatsClient:
        """The NATS connection of a client over NATS."""
        assert isinstance(self.transport, NatsTransport), "this client speaks HTTP"
        return self.transport.nc

    @property
    def over_nats(self) -> bool:
        return isinstance(self.transport, NatsTransport)

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    async def _call(self, route: Route, req: Any, reply_type: type[T], timeout_s: float | None = None) -> T:
        async def send(headers: Headers) -> T:
            return await self.transport.call(
                route, req, reply_type, headers=headers, timeout_s=timeout_s or self.timeout_s
            )

        return await self.auth.call(send) if route.auth else await send(None)

    async def _issue(self, api_key: str) -> TokenPair:
        return await self._call(routes.ISSUE_TOKENS, IssueTokens(api_key=api_key), TokenPair)

    async def _refresh(self, refresh_token: str) -> TokenPair:
        return await self._call(routes.REFRESH_TOKENS, RefreshTokens(refresh_token=refresh_token), TokenPair)

    # --- Jobs --------------------------------------------------------------------------------------

    async def submit(
        self,
        type: str,
        *,
        model: str | None = None,
        params: dict[str, Any] | None = None,
        region: str | None = None,
        priority: int = 0,
        max_attempts: int = 3,
        timeout_s: float = 300.0,
        idempotency_key: str | None = None,
        region_policy: RegionPolicy | None = None,
        max_latency_ms: float | None = None,
        webhook_url: str | None = None,
    ) -> Submitted:
        """Submit a job; `region` defaults to the client's (`region=` when it was made). Past a queue
        limit raises `QueueFull`, whose `retry_after_s` says when to try again."""
        req = SubmitJob(
            type=type, model=model, params=params or {}, region=region or self.region,  # type: ignore[arg-type]
            priority=priority, max_attempts=max_attempts, timeout_s=timeout_s, idempotency_key=idempotency_key,
            region_policy=region_policy, max_latency_ms=max_latency_ms, webhook_url=webhook_url,
        )
        return await self._call(routes.SUBMIT, req, Submitted)

    async def get(
        self, job_id: str, *, min_seq: int | None = None, at_seq: int | None = None, at_time: When | None = None
    ) -> JobView:
        """The job now, or as it was at a JOBS sequence (`at_seq`) or a moment (`at_time`: an aware
        datetime or RFC 3339 text), folded from the log."""
        req = GetJob(id=job_id, min_seq=min_seq, at_seq=at_seq, at_time=_moment(at_time))
        return await self._call(routes.GET_JOB, req, JobView)

    async def wait(self, job_id: str, *, timeout_s: float = 300.0) -> JobView:
        """The job once it is completed, failed, cancelled or expired; raises `Timeout` after `timeout_s`.

        The gateway watches the job's subject and answers when the ending event lands (no polling); a
        slice that runs out is a `Timeout` over NATS, the unfinished job (202) over HTTP.
        """
        remaining = timeout_s
        while True:
            slice_s = min(remaining, WAIT_SLICE_S)
            try:
                job = await self._call(routes.WAIT, WaitJob(id=job_id, timeout_s=slice_s), JobView, slice_s + 5)
                if JobStatus(job.status).terminal:
                    return job
            except Timeout:
                pass
            remaining -= slice_s
            if remaining <= 0:
                raise Timeout(f"job {job_id} is not finished after {timeout_s:g}s")

    async def stream(self, job_id: str, *, timeout_s: float = 300.0) -> AsyncIterator[str]:
        """An LLM job's text as it is generated. The pieces always add up to the final text, also for a
        reader that connects late; raises `JobError` if the job ends without a result."""
        pieces = self.transport.stream(job_id, self.auth, timeout_s, lambda: self.wait(job_id, timeout_s=timeout_s))
        async for item in pieces:
            if isinstance(item, str):
                yield item
            elif item.status != "completed":
                raise JobError(f"job {job_id} {item.status}", {"error": msgspec.to_builtins(item.error)})

    async def result(self, job_id: str, index: int = 0) -> bytes:
        """The bytes of a job's stored result `index` (an image job's PNGs)."""
        return await self._call(routes.RESULT, GetResult(id=job_id, index=index), bytes)

    async def cancel(self, job_id: str, *, reason: str | None = None) -> CancelAccepted:
        return await self._call(routes.CANCEL, CancelJob(id=job_id, reason=reason), CancelAccepted)

    async def list(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        worker_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        at_seq: int | None = None,
        at_time: When | None = None,
    ) -> JobPage:
        """Jobs newest first, now or as the list was at `at_seq` / `at_time` (see `get`)."""
        req = ListJobs(
            status=status, type=type, worker_id=worker_id, limit=limit, cursor=cursor, at_seq=at_seq,
            at_time=_moment(at_time),
        )
        return await self._call(routes.LIST_JOBS, req, JobPage)

    async def placement(self, job_id: str) -> PlacementView:
        """Where the job runs and why that worker won, or, while it is queued, why no worker takes it."""
        return await self._call(routes.PLACEMENT, ExplainPlacement(id=job_id), PlacementView)

    async def events(self, job_id: str) -> list[EventRecord]:
        page = await self._call(routes.EVENTS, JobEventsRequest(id=job_id), JobEvents)
        return page.items

    def direct(
        self,
        type: str,
        *,
        model: str | None = None,
        region: str | None = None,
        region_policy: RegionPolicy | None = None,
        max_latency_ms: float | None = None,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> DirectSession:
        """A direct session on a warm worker, for `async with` (`sdk.sessions`): its requests bypass the
        scheduler. `NoWorkerAvailable` (with the placement explanation's reasons) when none can take it."""
        opening = OpenSession(
            type=type, model=model, region=region or self.region, region_policy=region_policy,  # type: ignore[arg-type]
            max_latency_ms=max_latency_ms, ttl_s=ttl_s,
        )
        return DirectSession(self, opening)

    async def close_session(self, session_id: str) -> SessionClosedView:
        """Close a direct session (its owner's, or any for an operator); how it ended and its usage."""
        return await self._call(routes.DIRECT_CLOSE, SessionRef(id=session_id), SessionClosedView)

    # --- Workers and their configuration (an operator's key) ---------------------------------------

    async def workers(
        self, *, region: str | None = None, status: str | None = None, at_time: When | None = None
    ) -> list[WorkerView]:
        """The fleet now, or as it was at `at_time` (an aware datetime or RFC 3339 text)."""
        req = ListWorkers(region=region, status=status, at_time=_moment(at_time))
        page = await self._call(routes.LIST_WORKERS, req, WorkerPage)
        return page.items

    async def worker(self, worker_id: str) -> WorkerView:
        return await self._call(routes.GET_WORKER, GetWorker(id=worker_id), WorkerView)

    async def worker_config(self, worker_id: str) -> WorkerConfigView:
        return await self._call(routes.GET_WORKER_CONFIG, GetWorkerConfig(id=worker_id), WorkerConfigView)

    async def set_worker_config(self, worker_id: str, changes: dict[str, Any]) -> WorkerConfigView:
        """Merge `changes` (nested keys allowed) into the worker's runtime config; refused whole if any is bad."""
        req = SetWorkerConfig(id=worker_id, changes=changes)  # type: ignore[arg-type]  # the server checks
        return await self._call(routes.SET_WORKER_CONFIG, req, WorkerConfigView)

    async def set_config_defaults(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge `changes` into the runtime config every worker inherits (HTTP only)."""
        return await self._call(routes.SET_DEFAULTS, changes, dict[str, Any])

    async def regions(self) -> RegionLatencies:
        """The latency table between regions (HTTP only)."""
        return await self._call(routes.GET_REGIONS, None, RegionLatencies)

    async def set_regions(self, latency_ms: dict[str, dict[str, float]]) -> RegionLatencies:
        """Replace the latency table between regions (a pair given once counts both ways; HTTP only)."""
        return await self._call(routes.SET_REGIONS, {"latency_ms": latency_ms}, RegionLatencies)

    async def limits(self) -> QueueLimits:
        """The queue limits (HTTP only)."""
        return await self._call(routes.GET_LIMITS, None, QueueLimits)

    async def set_limits(self, limits: QueueLimits) -> QueueLimits:
        """Replace the queue limits past which submissions are refused with `QueueFull` (HTTP only)."""
        return await self._call(routes.SET_LIMITS, limits, QueueLimits)

    async def health(self) -> dict[str, str]:
        """The gateway's view of its dependencies; raises `Unavailable` while NATS is unreachable.
        Needs no credentials (HTTP only)."""
        return await self._call(routes.HEALTH, None, dict[str, str])

    async def metrics_text(self) -> str:
        """The gateway's Prometheus metrics (text format). Needs no credentials (HTTP only)."""
        return await self._call(routes.METRICS, None, str)

    # --- Admin (an operator's API key; HTTP only) --------------------------------------------------

    async def create_api_key(self, name: str, role: ApiKeyRole = "client") -> ApiKeyCreated:
        """A new API key; `api_key` in the reply is shown this once."""
        return await self._call(routes.CREATE_API_KEY, CreateApiKey(name=name, role=role), ApiKeyCreated)

    async def list_api_keys(self) -> list[ApiKeyInfo]:
        page = await self._call(routes.LIST_API_KEYS, None, ApiKeyList)
        return page.items

    async def revoke_api_key(self, key_id: str) -> None:
        await self._call(routes.REVOKE_API_KEY, {"key_id": key_id}, type(None))

    async def create_enrollment_token(self, *, ttl_s: float = 3600.0, worker_id: str | None = None) -> EnrollmentCreated:
        """A one-use token for `gpu-worker configure` (bound to `worker_id` when given)."""
        return await self._call(routes.ENROLL, CreateEnrollment(ttl_s=ttl_s, worker_id=worker_id), EnrollmentCreated)

    async def rotate_worker(self, worker_id: str) -> WorkerAction:
        """The worker switches to new credentials at its next heartbeat."""
        return await self._call(routes.ROTATE_WORKER, {"worker_id": worker_id}, WorkerAction)

    async def revoke_worker(self, worker_id: str) -> WorkerAction:
        """The worker's requests are refused from now on; its jobs are requeued."""
        return await self._call(routes.REVOKE_WORKER, {"worker_id": worker_id}, WorkerAction)


def _moment(at: When | None) -> str | None:
    """`at` as the RFC 3339 text the API takes; a naive datetime is refused (whose clock would it be?)."""
    if isinstance(at, dt.datetime):
        if at.tzinfo is None:
            raise BadRequest(f"at_time {at} has no time zone; pass an aware datetime (e.g. tz=datetime.UTC)")
        return at.isoformat()
    return at
