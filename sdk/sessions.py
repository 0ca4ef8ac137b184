"""The SDK's direct sessions (`sdk.direct`): a leased worker slot, talked to without the scheduler.

    async with client.direct("llm", model="gpt2") as session:
        reply = await session.run({"prompt": "Hello", "max_new_tokens": 16})
        async for piece in session.stream({"prompt": "Once upon a time"}):
            print(piece, end="")

Over NATS (`Client.connect`) each request goes straight to the worker's subject with the session
token; over HTTP (`HttpClient`) the gateway relays it (`POST .../run`), and `stream` yields the whole
text at once. A session whose worker is lost, draining or gone raises `SessionEnded`: open another.
Leaving the `async with` closes the session (its slot is freed, its usage logged).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from sdk import subjects
from sdk import transport as routes
from sdk.connection import decode_reply, request
from sdk.direct import (
    DirectRequest,
    DirectResult,
    DirectSessionView,
    OpenSession,
    RunDirect,
    SessionClosedView,
)
from sdk.errors import SessionEnded, Timeout, Unavailable
from sdk.events import encoder
from sdk.streaming import TextAssembler

if TYPE_CHECKING:
    from sdk.client import Client

#: The longest one request waits for its answer (or for the next piece of its stream).
REQUEST_TIMEOUT_S = 300.0


class DirectSession:
    def __init__(self, client: Client, opening: OpenSession) -> None:
        self._client = client
        self._opening = opening
        self._view: DirectSessionView | None = None
        #: How the session ended, once `close()` answered.
        self.closed: SessionClosedView | None = None

    @property
    def view(self) -> DirectSessionView:
        """The session as opened: id, worker, region, subject, token, expiry."""
        assert self._view is not None, "open the session first (async with)"
        return self._view

    async def open(self) -> DirectSessionView:
        self._view = await self._client._call(routes.DIRECT_OPEN, self._opening, DirectSessionView)
        return self._view

    async def close(self) -> SessionClosedView:
        """End the session (idempotent): its slot is freed; the answer says how it ended and its usage."""
        self.closed = await self._client.close_session(self.view.session_id)
        return self.closed

    async def __aenter__(self) -> DirectSession:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def run(self, params: dict[str, Any] | None = None, *, timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
        """One request's result (an engine's failure raises `JobError` with its code in `details`)."""
        if self._client.over_nats:
            req = DirectRequest(token=self.view.token, params=params or {})
            try:
                reply = await request(self._client.nc, self.view.subject, req, DirectResult, timeout_s=timeout_s)
            except Unavailable:
                raise self._gone() from None
        else:
            relayed = {"id": self.view.session_id, "run": RunDirect(params=params or {})}
            reply = await self._client._call(routes.DIRECT_RUN, relayed, DirectResult, timeout_s)
        return reply.result

    async def stream(self, params: dict[str, Any] | None = None, *, timeout_s: float = REQUEST_TIMEOUT_S) -> AsyncIterator[str]:
        """An LLM request's text as it is generated; the pieces add up to the result's `text`."""
        if not self._client.over_nats:
            result = await self.run(params, timeout_s=timeout_s)
            yield result.get("text", "") if isinstance(result, dict) else ""
            return
        nc = self._client.nc
        messages: asyncio.Queue[Msg] = asyncio.Queue()
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=messages.put)
        assembler = TextAssembler()
        try:
            req = DirectRequest(token=self.view.token, params=params or {}, stream=True)
            await nc.publish(self.view.subject, encoder.encode(req), reply=inbox)
            while True:
                msg = await asyncio.wait_for(messages.get(), timeout_s)
                if (msg.headers or {}).get("Status") == "503":
                    raise self._gone()
                if (msg.headers or {}).get(subjects.STREAM_END_HEADER):
                    result = decode_reply(msg, DirectResult).result
                    final = result.get("text") if isinstance(result, dict) else None
                    if isinstance(final, str) and final[assembler.received_chars :]:
                        yield final[assembler.received_chars :]
                    return
                decode_reply(msg, bytes)  # an error reply ends the stream with its error
                if text := assembler.feed(msg.data):
                    yield text
        except TimeoutError:
            raise Timeout(f"direct session {self.view.session_id}: no answer within {timeout_s:g}s") from None
        finally:
            await sub.unsubscribe()

    def _gone(self) -> SessionEnded:
        return SessionEnded(
            f"worker {self.view.worker_id} of session {self.view.session_id} does not answer (lost or gone); "
            "open another session", {"reason": "worker_gone"},
        )
