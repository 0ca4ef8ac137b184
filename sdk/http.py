"""`HttpClient`: the SDK over the HTTP gateway, with the same methods and types as `Client`."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx
import msgspec

from sdk.api import CancelAccepted, EventRecord, JobEvents, JobPage, JobView, SubmitJob, Submitted, WorkerPage, WorkerView
from sdk.client import WAIT_SLICE_S
from sdk.errors import ErrorReply, Timeout, Unavailable, from_reply

_encoder = msgspec.json.Encoder()


class HttpClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, timeout_s: float = 10.0, **options: Any) -> None:
        self.timeout_s = timeout_s
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s, **options)

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
        content = None if body is None else _encoder.encode(body)
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = await self._http.request(
                method, path, content=content, params=query, timeout=timeout_s or self.timeout_s,
                headers={"content-type": "application/json"} if content is not None else None,
            )
        except httpx.TimeoutException:
            raise Timeout(f"{method} {path}: no answer within {timeout_s or self.timeout_s}s") from None
        except httpx.TransportError as exc:
            raise Unavailable(f"{method} {path}: {exc}") from None
        if response.status_code >= 400:
            try:
                reply = msgspec.json.decode(response.content, type=ErrorReply)
            except msgspec.DecodeError:
                reply = ErrorReply(code="http_error", message=f"HTTP {response.status_code}: {response.text[:200]}")
            raise from_reply(reply)
        return msgspec.json.decode(response.content, type=reply_type)

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
    ) -> Submitted:
        req = SubmitJob(
            type=type, model=model, params=params or {}, region=region, priority=priority,
            max_attempts=max_attempts, timeout_s=timeout_s, idempotency_key=idempotency_key,
        )
        return await self._call("POST", "/api/v1/jobs", Submitted, body=req)

    async def get(self, job_id: str, *, min_seq: int | None = None) -> JobView:
        return await self._call("GET", f"/api/v1/jobs/{job_id}", JobView, params={"min_seq": min_seq})

    async def wait(self, job_id: str, *, timeout_s: float = 300.0) -> JobView:
        """The job once it is finished (the gateway answers when the ending event lands)."""
        remaining = timeout_s
        while True:
            slice_s = min(remaining, WAIT_SLICE_S)
            try:
                return await self._call(
                    "GET", f"/api/v1/jobs/{job_id}/wait", JobView, params={"timeout_s": slice_s}, timeout_s=slice_s + 5
                )
            except Timeout:
                remaining -= slice_s
                if remaining <= 0:
                    raise

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
