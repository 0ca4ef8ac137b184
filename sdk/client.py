"""The Python SDK: `Client` speaks NATS request-reply to the gateway; `HttpClient` (sdk.http) speaks
HTTP. Both have the same methods, return the same typed structs and raise the same typed errors.

    async with await Client.connect("nats://client:<password>@127.0.0.1:4222", api_key="gfk_...") as client:
        job = await client.submit("echo", params={"hello": "world"})
        done = await client.wait(job.id)
        print(done.status, done.result)

Both take an API key (default: `$GF_API_KEY`) and handle its tokens themselves (`sdk.auth`). Over NATS
the `client` user reaches the job API only; the worker and config queries need an operator's key and
the HTTP API (or the `platform` user, as operator tools do).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from sdk import subjects
from sdk.api import (
    CancelAccepted,
    CancelJob,
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
    WorkerConfigView,
    WorkerPage,
    WorkerView,
)
from sdk.auth import Headers, TokenSession
from sdk.connection import connect, decode_reply, request
from sdk.errors import JobError, Timeout
from sdk.events import encoder
from sdk.placement import ExplainPlacement, PlacementView
from sdk.streaming import assemble

#: The gateway answers a wait within this long; longer waits are several requests.
WAIT_SLICE_S = 60.0


class Client:
    def __init__(
        self, nc: NatsClient, *, api_key: str | None = None, timeout_s: float = 10.0, region: str | None = None
    ) -> None:
        self.nc = nc
        self.timeout_s = timeout_s
        #: The region a job runs near when `submit` names none.
        self.region = region
        self.auth = TokenSession(api_key, issue=self._issue, refresh=self._refresh)

    @classmethod
    async def connect(
        cls, url: str | None = None, *, api_key: str | None = None, timeout_s: float = 10.0,
        region: str | None = None, **options: Any,
    ) -> Client:
        """Connect to NATS (`url` may carry the user and password; `tls=` takes an `ssl.SSLContext`);
        `region` is where this client's jobs run nearest unless `submit` says otherwise."""
        nc = await connect(url, name="sdk-client", **options)
        return cls(nc, api_key=api_key, timeout_s=timeout_s, region=region)

    async def close(self) -> None:
        await self.nc.drain()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    async def _call(self, subject: str, payload: Any, reply_type: Any, timeout_s: float | None = None) -> Any:
        async def send(headers: Headers) -> Any:
            return await request(
                self.nc, subject, payload, reply_type, timeout_s=timeout_s or self.timeout_s, headers=headers
            )

        return await self.auth.call(send)

    async def _issue(self, api_key: str) -> TokenPair:
        return await request(self.nc, subjects.API_AUTH_TOKEN, IssueTokens(api_key=api_key), TokenPair)

    async def _refresh(self, refresh_token: str) -> TokenPair:
        req = RefreshTokens(refresh_token=refresh_token)
        return await request(self.nc, subjects.API_AUTH_REFRESH, req, TokenPair)

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
    ) -> Submitted:
        """Submit a job; `region` defaults to the client's (`region=` when it was made). Past a queue
        limit raises `QueueFull`, whose `retry_after_s` says when to try again."""
        req = SubmitJob(
            type=type, model=model, params=params or {}, region=region or self.region, priority=priority,
            max_attempts=max_attempts, timeout_s=timeout_s, idempotency_key=idempotency_key,
            region_policy=region_policy, max_latency_ms=max_latency_ms,
        )
        return await self._call(subjects.API_JOBS_SUBMIT, req, Submitted)

    async def get(self, job_id: str, *, min_seq: int | None = None) -> JobView:
        return await self._call(subjects.API_JOBS_GET, GetJob(id=job_id, min_seq=min_seq), JobView)

    async def wait(self, job_id: str, *, timeout_s: float = 300.0) -> JobView:
        """The job once it is completed, failed, cancelled or expired; raises `Timeout` after `timeout_s`.

        The gateway watches the job's subject and answers when the ending event lands (no polling).
        """
        remaining = timeout_s
        while True:
            slice_s = min(remaining, WAIT_SLICE_S)
            try:
                return await self._call(
                    subjects.API_JOBS_WAIT, WaitJob(id=job_id, timeout_s=slice_s), JobView, timeout_s=slice_s + 5
                )
            except Timeout:
                remaining -= slice_s
                if remaining <= 0:
                    raise

    async def stream(self, job_id: str, *, timeout_s: float = 300.0) -> AsyncIterator[str]:
        """An LLM job's text as it is generated. The pieces always add up to the final text, also for a
        reader that subscribes late; raises `JobError` if the job ends without a result."""
        chunks: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_chunk(msg: Msg) -> None:
            chunks.put_nowait(msg.data)

        sub = await self.nc.subscribe(subjects.stream_subject(job_id), cb=on_chunk)
        try:
            async for item in assemble(chunks, self.wait(job_id, timeout_s=timeout_s)):
                if isinstance(item, str):
                    yield item
                elif item.status != "completed":
                    raise JobError(f"job {job_id} {item.status}", {"error": msgspec.to_builtins(item.error)})
        finally:
            await sub.unsubscribe()

    async def result(self, job_id: str, index: int = 0) -> bytes:
        """The bytes of a job's stored result `index` (an image job's PNGs)."""
        payload = encoder.encode(GetResult(id=job_id, index=index))

        async def send(headers: Headers) -> bytes:
            msg = await self.nc.request(subjects.API_JOBS_RESULT, payload, timeout=self.timeout_s, headers=headers)
            if msg.data.startswith(b'{"kind":"error"'):
                decode_reply(msg.data, None)
            return msg.data

        return await self.auth.call(send)

    async def cancel(self, job_id: str, *, reason: str | None = None) -> CancelAccepted:
        return await self._call(subjects.API_JOBS_CANCEL, CancelJob(id=job_id, reason=reason), CancelAccepted)

    async def list(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        worker_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        req = ListJobs(status=status, type=type, worker_id=worker_id, limit=limit, cursor=cursor)
        return await self._call(subjects.API_JOBS_LIST, req, JobPage)

    async def placement(self, job_id: str) -> PlacementView:
        """Where the job runs and why that worker won, or, while it is queued, why no worker takes it."""
        return await self._call(subjects.API_JOBS_PLACEMENT, ExplainPlacement(id=job_id), PlacementView)

    async def events(self, job_id: str) -> list[EventRecord]:
        page: JobEvents = await self._call(subjects.API_JOBS_EVENTS, JobEventsRequest(id=job_id), JobEvents)
        return page.items

    async def workers(self, *, region: str | None = None, status: str | None = None) -> list[WorkerView]:
        page: WorkerPage = await self._call(subjects.API_WORKERS_LIST, ListWorkers(region=region, status=status), WorkerPage)
        return page.items

    async def worker(self, worker_id: str) -> WorkerView:
        return await self._call(subjects.API_WORKERS_GET, GetWorker(id=worker_id), WorkerView)

    async def worker_config(self, worker_id: str) -> WorkerConfigView:
        return await self._call(subjects.API_WORKERS_CONFIG_GET, GetWorkerConfig(id=worker_id), WorkerConfigView)

    async def set_worker_config(self, worker_id: str, changes: dict[str, Any]) -> WorkerConfigView:
        """Merge `changes` (nested keys allowed) into the worker's runtime config; refused whole if any is bad."""
        req = SetWorkerConfig(id=worker_id, changes=changes)
        return await self._call(subjects.API_WORKERS_CONFIG_SET, req, WorkerConfigView)
