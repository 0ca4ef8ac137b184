"""`HttpClient`: the SDK over the HTTP gateway, with the same methods and types as `Client`, plus the
operator's admin calls (API keys, enrollment tokens, rotating and revoking workers).

    async with HttpClient("https://gateway.example", api_key="gfk_...") as client: ...

`verify` is True (system CAs), a CA bundle path, an `ssl.SSLContext`, or False (dev only: see sdk.tls).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import httpx
import msgspec

from sdk.api import (
    ApiKeyCreated,
    ApiKeyInfo,
    ApiKeyList,
    ApiKeyRole,
    CancelAccepted,
    CreateApiKey,
    CreateEnrollment,
    EnrollmentCreated,
    EventRecord,
    IssueTokens,
    JobEvents,
    JobPage,
    JobView,
    RefreshTokens,
    RegionPolicy,
    SubmitJob,
    Submitted,
    TokenPair,
    WorkerAction,
    WorkerConfigView,
    WorkerPage,
    WorkerView,
)
from sdk.auth import Headers, TokenSession
from sdk.client import WAIT_SLICE_S
from sdk.errors import ErrorReply, JobError, PlatformError, Timeout, Unavailable, from_reply
from sdk.jobs import JobStatus
from sdk.placement import PlacementView
from sdk.platform_config import QueueLimits
from sdk.regions import RegionLatencies
from sdk.tls import Verify, httpx_verify

_encoder = msgspec.json.Encoder()


class HttpClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        verify: Verify = True,
        region: str | None = None,
        **options: Any,
    ) -> None:
        self.timeout_s = timeout_s
        #: The region a job runs near when `submit` names none.
        self.region = region
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout_s, verify=httpx_verify(verify), **options
        )
        self.auth = TokenSession(api_key, issue=self._issue, refresh=self._refresh)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    async def _call(
        self, method: str, path: str, reply_type: Any, *, body: Any = None, params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        async def send(headers: Headers) -> Any:
            return await self._send(method, path, reply_type, body, params, timeout_s, headers)

        return await self.auth.call(send)

    async def _send(
        self, method: str, path: str, reply_type: Any, body: Any, params: dict[str, Any] | None,
        timeout_s: float | None, auth: Headers,
    ) -> Any:
        content = None if body is None else _encoder.encode(body)
        query = {k: v for k, v in (params or {}).items() if v is not None}
        headers = {**({"content-type": "application/json"} if content is not None else {}), **(auth or {})}
        try:
            response = await self._http.request(
                method, path, content=content, params=query, timeout=timeout_s or self.timeout_s, headers=headers
            )
        except httpx.TimeoutException:
            raise Timeout(f"{method} {path}: no answer within {timeout_s or self.timeout_s}s") from None
        except httpx.TransportError as exc:
            raise Unavailable(f"{method} {path}: {exc}") from None
        if response.status_code >= 400:
            raise _error(response)
        if reply_type is None:
            return None
        if reply_type is bytes:
            return response.content
        return msgspec.json.decode(response.content, type=reply_type)

    async def _issue(self, api_key: str) -> TokenPair:
        return await self._send("POST", "/api/v1/auth/token", TokenPair, IssueTokens(api_key=api_key), None, None, None)

    async def _refresh(self, refresh_token: str) -> TokenPair:
        body = RefreshTokens(refresh_token=refresh_token)
        return await self._send("POST", "/api/v1/auth/refresh", TokenPair, body, None, None, None)

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
        return await self._call("POST", "/api/v1/jobs", Submitted, body=req)

    async def get(self, job_id: str, *, min_seq: int | None = None) -> JobView:
        return await self._call("GET", f"/api/v1/jobs/{job_id}", JobView, params={"min_seq": min_seq})

    async def wait(self, job_id: str, *, timeout_s: float = 300.0) -> JobView:
        """The job once it is finished (the gateway answers when the ending event lands); raises
        `Timeout` after `timeout_s`. A slice that runs out answers 202 with the unfinished job."""
        remaining = timeout_s
        while True:
            slice_s = min(remaining, WAIT_SLICE_S)
            try:
                job: JobView = await self._call(
                    "GET", f"/api/v1/jobs/{job_id}/wait", JobView, params={"timeout_s": slice_s}, timeout_s=slice_s + 5
                )
                if JobStatus(job.status).terminal:
                    return job
            except Timeout:
                pass
            remaining -= slice_s
            if remaining <= 0:
                raise Timeout(f"job {job_id} is not finished after {timeout_s:g}s")

    async def stream(self, job_id: str, *, timeout_s: float = 300.0) -> AsyncIterator[str]:
        """An LLM job's text as it is generated (server-sent events); the pieces add up to the final
        text, also when connecting late; raises `JobError` if the job ends without a result."""

        async def open_stream(headers: Headers) -> httpx.Response:
            request = self._http.build_request(
                "GET", f"/api/v1/jobs/{job_id}/stream", headers=headers, timeout=timeout_s
            )
            response = await self._http.send(request, stream=True)
            if response.status_code >= 400:
                await response.aread()
                await response.aclose()
                raise _error(response)
            return response

        try:
            response = await self.auth.call(open_stream)
            try:
                event = ""
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event == "token":
                        yield msgspec.json.decode(line[5:].strip(), type=str)
                    elif line.startswith("data:") and event == "done":
                        job = msgspec.json.decode(line[5:].strip(), type=JobView)
                        if job.status != "completed":
                            raise JobError(f"job {job_id} {job.status}", {"error": msgspec.to_builtins(job.error)})
                        return
                    elif line.startswith("data:") and event == "error":
                        raise from_reply(msgspec.json.decode(line[5:].strip(), type=ErrorReply))
                raise Unavailable(f"stream of job {job_id} ended before the job finished")
            finally:
                await response.aclose()
        except httpx.TimeoutException:
            raise Timeout(f"stream of job {job_id}: nothing within {timeout_s}s") from None
        except httpx.TransportError as exc:
            raise Unavailable(f"stream of job {job_id}: {exc}") from None

    async def result(self, job_id: str, index: int = 0) -> bytes:
        """The bytes of a job's stored result `index` (an image job's PNGs)."""
        return await self._call("GET", f"/api/v1/jobs/{job_id}/result/{index}", bytes)

    async def cancel(self, job_id: str, *, reason: str | None = None) -> CancelAccepted:
        return await self._call("POST", f"/api/v1/jobs/{job_id}/cancel", CancelAccepted, params={"reason": reason})

    async def list(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        worker_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        params = {"status": status, "type": type, "worker_id": worker_id, "limit": limit, "cursor": cursor}
        return await self._call("GET", "/api/v1/jobs", JobPage, params=params)

    async def events(self, job_id: str) -> list[EventRecord]:
        page: JobEvents = await self._call("GET", f"/api/v1/jobs/{job_id}/events", JobEvents)
        return page.items

    async def workers(self, *, region: str | None = None, status: str | None = None) -> list[WorkerView]:
        page: WorkerPage = await self._call("GET", "/api/v1/workers", WorkerPage, params={"region": region, "status": status})
        return page.items

    async def worker(self, worker_id: str) -> WorkerView:
        return await self._call("GET", f"/api/v1/workers/{worker_id}", WorkerView)

    async def worker_config(self, worker_id: str) -> WorkerConfigView:
        return await self._call("GET", f"/api/v1/workers/{worker_id}/config", WorkerConfigView)

    async def set_worker_config(self, worker_id: str, changes: dict[str, Any]) -> WorkerConfigView:
        """Merge `changes` (nested keys allowed) into the worker's runtime config; refused whole if any is bad."""
        return await self._call("PUT", f"/api/v1/workers/{worker_id}/config", WorkerConfigView, body=changes)

    async def set_config_defaults(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge `changes` into the runtime config every worker inherits."""
        return await self._call("PUT", "/api/v1/config/defaults", dict[str, Any], body=changes)

    async def placement(self, job_id: str) -> PlacementView:
        """Where the job runs and why that worker won, or, while it is queued, why no worker takes it."""
        return await self._call("GET", f"/api/v1/jobs/{job_id}/placement", PlacementView)

    async def regions(self) -> RegionLatencies:
        return await self._call("GET", "/api/v1/config/regions", RegionLatencies)

    async def set_regions(self, latency_ms: dict[str, dict[str, float]]) -> RegionLatencies:
        """Replace the latency table between regions (a pair given once counts both ways)."""
        body = {"latency_ms": latency_ms}
        return await self._call("PUT", "/api/v1/config/regions", RegionLatencies, body=body)

    async def limits(self) -> QueueLimits:
        return await self._call("GET", "/api/v1/config/limits", QueueLimits)

    async def set_limits(self, limits: QueueLimits) -> QueueLimits:
        """Replace the queue limits past which submissions are refused with `QueueFull`."""
        return await self._call("PUT", "/api/v1/config/limits", QueueLimits, body=limits)

    async def health(self) -> dict[str, str]:
        """The gateway's view of its dependencies; raises `Unavailable` while NATS is unreachable.
        Needs no credentials."""
        return await self._send("GET", "/health", dict[str, str], None, None, None, None)

    async def metrics_text(self) -> str:
        """The gateway's Prometheus metrics (text format). Needs no credentials."""
        try:
            response = await self._http.get("/metrics")
        except httpx.TransportError as exc:
            raise Unavailable(f"GET /metrics: {exc}") from None
        if response.status_code >= 400:
            raise _error(response)
        return response.text

    # --- Admin (an operator's API key) -------------------------------------------------------------

    async def create_api_key(self, name: str, role: ApiKeyRole = "client") -> ApiKeyCreated:
        """A new API key; `api_key` in the reply is shown this once."""
        return await self._call("POST", "/api/v1/admin/keys", ApiKeyCreated, body=CreateApiKey(name=name, role=role))

    async def list_api_keys(self) -> list[ApiKeyInfo]:
        page: ApiKeyList = await self._call("GET", "/api/v1/admin/keys", ApiKeyList)
        return page.items

    async def revoke_api_key(self, key_id: str) -> None:
        await self._call("DELETE", f"/api/v1/admin/keys/{key_id}", None)

    async def create_enrollment_token(
        self, *, ttl_s: float = 3600.0, worker_id: str | None = None
    ) -> EnrollmentCreated:
        """A one-use token for `gpu-worker configure` (bound to `worker_id` when given)."""
        body = CreateEnrollment(ttl_s=ttl_s, worker_id=worker_id)
        return await self._call("POST", "/api/v1/admin/workers/enroll", EnrollmentCreated, body=body)

    async def rotate_worker(self, worker_id: str) -> WorkerAction:
        """The worker switches to new credentials at its next heartbeat."""
        return await self._call("POST", f"/api/v1/admin/workers/{worker_id}/rotate", WorkerAction)

    async def revoke_worker(self, worker_id: str) -> WorkerAction:
        """The worker's requests are refused from now on; its jobs are requeued."""
        return await self._call("POST", f"/api/v1/admin/workers/{worker_id}/revoke", WorkerAction)


def _error(response: httpx.Response) -> PlatformError:
    """The typed error of an HTTP error response (the gateway's body is `{code, message, details}`)."""
    try:
        reply = msgspec.json.decode(response.content, type=ErrorReply)
    except msgspec.DecodeError:
        reply = ErrorReply(code="http_error", message=f"HTTP {response.status_code}: {response.text[:200]}")
    return from_reply(reply)
