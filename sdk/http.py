"""The SDK over the HTTP gateway: `HttpClient` is `sdk.client.Client` over `HttpTransport`, with the
same methods and types, plus what only HTTP offers (admin calls, the defaults, health).

    async with HttpClient("https://gateway.example", api_key="gfk_...") as client: ...

`verify` is True (system CAs), a CA bundle path, an `ssl.SSLContext`, or False (dev only: see sdk.tls).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import msgspec
from httpx_sse import EventSource

from sdk.api import JobView
from sdk.auth import Headers, TokenSession
from sdk.client import Client
from sdk.errors import ErrorReply, PlatformError, Timeout, Unavailable, from_reply
from sdk.tls import Verify, httpx_verify
from sdk.transport import WHOLE, Route, fields

T = TypeVar("T")
_encoder = msgspec.json.Encoder()
_PLACEHOLDER = re.compile(r"{(\w+)}")


class HttpTransport:
    """The routes' HTTP half; a job's text as server-sent events."""

    def __init__(self, base_url: str, *, timeout_s: float, verify: Verify, **options: Any) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout_s, verify=httpx_verify(verify), **options
        )

    async def call(
        self, route: Route, req: Any, reply_type: type[T], *, headers: Headers, timeout_s: float
    ) -> T:
        values = req if isinstance(req, dict) else fields(req)
        in_path = set(_PLACEHOLDER.findall(route.path))
        path = route.path.format(**{name: quote(str(values[name]), safe="") for name in in_path})
        body: Any = None
        query: dict[str, Any] = {}
        if route.body == WHOLE:
            body = req
        elif route.body is not None:
            body = values[route.body]
        else:
            query = {name: value for name, value in values.items() if name not in in_path and value is not None}
        content = None if body is None else _encoder.encode(body)
        sent = {**({"content-type": "application/json"} if content is not None else {}), **(headers or {})}
        what = f"{route.method} {path}"
        try:
            response = await self._http.request(
                route.method, path, content=content, params=query, headers=sent, timeout=timeout_s
            )
        except httpx.TimeoutException:
            raise Timeout(f"{what}: no answer within {timeout_s}s") from None
        except httpx.TransportError as exc:
            raise Unavailable(f"{what}: {exc}") from None
        if response.status_code >= 400:
            raise _error(response)
        if reply_type is type(None):
            return None  # type: ignore[return-value]
        if reply_type is bytes:
            return response.content  # type: ignore[return-value]
        if reply_type is str:
            return response.text  # type: ignore[return-value]
        return msgspec.json.decode(response.content, type=reply_type)

    async def stream(
        self, job_id: str, auth: TokenSession, timeout_s: float, finished: Callable[[], Awaitable[JobView]]
    ) -> AsyncIterator[str | JobView]:
        """`token` events, then `done` with the finished job, or `error` (e.g. the gateway shuts down)."""

        async def open_stream(headers: Headers) -> httpx.Response:
            request = self._http.build_request(
                "GET", f"/api/v1/jobs/{quote(job_id, safe='')}/stream",
                headers={**(headers or {}), "Accept": "text/event-stream"}, timeout=timeout_s,
            )
            response = await self._http.send(request, stream=True)
            if response.status_code >= 400:
                await response.aread()
                await response.aclose()
                raise _error(response)
            return response

        try:
            response = await auth.call(open_stream)
            try:
                async for event in EventSource(response).aiter_sse():
                    if event.event == "token":
                        yield msgspec.json.decode(event.data, type=str)
                    elif event.event == "done":
                        yield msgspec.json.decode(event.data, type=JobView)
                        return
                    elif event.event == "error":
                        raise from_reply(msgspec.json.decode(event.data, type=ErrorReply))
                raise Unavailable(f"stream of job {job_id} ended before the job finished")
            finally:
                await response.aclose()
        except httpx.TimeoutException:
            raise Timeout(f"stream of job {job_id}: nothing within {timeout_s}s") from None
        except httpx.TransportError as exc:
            raise Unavailable(f"stream of job {job_id}: {exc}") from None

    async def close(self) -> None:
        await self._http.aclose()


class HttpClient(Client):
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
        transport = HttpTransport(base_url, timeout_s=timeout_s, verify=verify, **options)
        super().__init__(transport, api_key=api_key, timeout_s=timeout_s, region=region)

    async def __aenter__(self) -> HttpClient:
        return self


def _error(response: httpx.Response) -> PlatformError:
    """The typed error of an HTTP error response (the gateway's body is `{code, message, details}`)."""
    try:
        reply = msgspec.json.decode(response.content, type=ErrorReply)
    except msgspec.DecodeError:
        reply = ErrorReply(code="http_error", message=f"HTTP {response.status_code}: {response.text[:200]}")
    return from_reply(reply)
