"""The Python SDK: `Client` speaks NATS request-reply to the gateway; `HttpClient` (sdk.http) speaks
HTTP. Both have the same methods, return the same typed structs and raise the same typed errors.

    async with await Client.connect("nats://127.0.0.1:4222", api_key="gfk_...") as client:
        job = await client.submit("echo", params={"hello": "world"})
        done = await client.wait(job.id)
        print(done.status, done.result)

Both take an API key (default: `$GF_API_KEY`) and handle its tokens themselves (`sdk.auth`). Over NATS
the key is also the connection's identity (`sdk.bus`): a client reaches the job API and its own inboxes
only; an operator's key also the worker and config queries.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from sdk import bus, subjects
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
    StreamChunk,
    SubmitJob,
    Submitted,
    TokenPair,
    WaitJob,
    WorkerConfigView,
    WorkerPage,
    WorkerView,
)
from sdk.auth import API_KEY_ENV, Headers, TokenSession
from sdk.connection import connect, decode_reply, nats_url_from_env, request
from sdk.errors import JobError, Timeout
from sdk.placement import ExplainPlacement, PlacementView

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
        """Connect to NATS: as the client the API key (argument or `$GF_API_KEY`) proves (`sdk.bus`), or as
        the user `url` names (operator tools, as `platform`). `tls=` takes an `ssl.SSLContext`; `region` is
        where this client's jobs run nearest unless `submit` says otherwise."""
        api_key = api_key or os.environ.get(API_KEY_ENV) or None
        if api_key is not None and bus.identity_needed(nats_url_from_env(url)):
            options = {**bus.client_options(api_key), **options}
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
        reader that subscribes late; raises `JobError` if the job ends without a result. The gateway
        sends them to this client's inbox (`api.jobs.stream`), only chunks of the worker holding the job."""
        messages: asyncio.Queue[Msg] = asyncio.Queue()
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=messages.put)
        request = encoder.encode(WaitJob(id=job_id, timeout_s=timeout_s))

        async def first_message(headers: Headers) -> Msg:
            await self.nc.publish(subjects.API_JOBS_STREAM, request, reply=inbox, headers=headers)
            msg = await asyncio.wait_for(messages.get(), timeout_s + self.timeout_s)
            if (msg.headers or {}).get(subjects.ERROR_CODE_HEADER):
                decode_reply(msg, bytes)  # raises it; an expired token is renewed and sent again
            return msg

        try:
            msg = await self.auth.call(first_message)
            while True:
                if (msg.headers or {}).get(subjects.STREAM_END_HEADER):
                    job = decode_reply(msg, JobView)
                    if job.status != "completed":
                        raise JobError(f"job {job_id} {job.status}", {"error": msgspec.to_builtins(job.error)})
                    return
                yield decode_reply(msg, StreamChunk).text
                msg = await asyncio.wait_for(messages.get(), timeout_s + self.timeout_s)
        except TimeoutError:
            raise Timeout(f"job {job_id} is not finished after {timeout_s}s") from None
        finally:
            await sub.unsubscribe()

    async def result(self, job_id: str, index: int = 0) -> bytes:
        """The bytes of a job's stored result `index` (an image job's PNGs)."""
        return await self._call(subjects.API_JOBS_RESULT, GetResult(id=job_id, index=index), bytes)

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
