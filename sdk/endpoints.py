"""One small server for NATS request-reply endpoints: the gateway's `api.>` and the projections' `proj.>`.

Each request runs in a task of its own. A subscription's callbacks run one at a time, so a slow request
(a wait, a read waiting for `min_seq`) would hold up every request behind it; nats-py's `nats.micro`
calls its handlers that way (20 requests to a handler of 0.1 s take 2.0 s), hence this instead.

Each endpoint runs at most `max_in_flight` handlers at once; more requests wait in its subscription's
queue (nats-py's pending limits bound that), so a flood costs memory in proportion to the bound, and
long polls on one endpoint never take the slots of another.

Every request is answered, never silence: the handler's reply (a struct, or bytes as they are), or an
`ErrorReply` marked by the error headers (`sdk.connection.error_reply`); an unexpected exception is
logged and answered as `internal`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from sdk.connection import error_reply
from sdk.errors import PlatformError, Unavailable
from sdk.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

Handler = Callable[[Msg], Awaitable[Any]]
_encoder = msgspec.json.Encoder()
#: Handlers of one endpoint running at once in one process.
MAX_IN_FLIGHT = 256
#: What a handler returns when it has sent its answers itself (a stream of several messages).
STREAMED = object()


class Endpoints:
    """The endpoints of one service, in its queue group, until `stop()`."""

    def __init__(self, nc: NatsClient, *, queue: str, name: str, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._nc = nc
        self._queue = queue
        self._max_in_flight = max_in_flight
        #: Who answers, in logs and in the message of an internal error.
        self._name = name
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, routes: Mapping[str, Handler]) -> None:
        for subject, handler in routes.items():
            self._subs.append(await self._nc.subscribe(subject, queue=self._queue, cb=self._spawner(handler)))
        logger.info("%s answering %d NATS endpoints", self._name, len(routes))

    async def stop(self, grace_s: float = 0.0) -> None:
        """Take no more requests, give those in flight `grace_s` to answer, cancel the rest. Idempotent."""
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._subs.clear()
        if self._tasks and grace_s > 0:
            await asyncio.wait(self._tasks, timeout=grace_s)
        await cancel_and_wait(*self._tasks)

    def _spawner(self, handler: Handler) -> Callable[[Msg], Awaitable[None]]:
        slots = asyncio.Semaphore(self._max_in_flight)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            slots.release()

        async def spawn(msg: Msg) -> None:
            # Waiting here holds back this endpoint's subscription only; its next message stays queued.
            await slots.acquire()
            task = asyncio.create_task(self._answer(msg, handler))
            self._tasks.add(task)  # kept until done: a task nobody holds may be collected mid-flight
            task.add_done_callback(done)

        return spawn

    async def _answer(self, msg: Msg, handler: Handler) -> None:
        headers: dict[str, str] | None = None
        try:
            answer = await handler(msg)
            if answer is STREAMED:
                return
            reply = answer if isinstance(answer, bytes) else _encoder.encode(answer)
        except PlatformError as exc:
            reply, headers = error_reply(exc)
        except (NoStreamResponseError, ServiceUnavailableError, nats.errors.TimeoutError) as exc:
            # A stream failing over to another node (or JetStream electing its leader): try again soon.
            reply, headers = error_reply(Unavailable(f"the event log is not answering now: {type(exc).__name__}"))
        except asyncio.CancelledError:  # stopped: the caller learns it now, not at its timeout
            if msg.reply:
                reply, headers = error_reply(Unavailable(f"{self._name} is stopping"))
                with contextlib.suppress(nats.errors.Error):
                    await self._nc.publish(msg.reply, reply, headers=headers)
            raise
        except Exception as exc:
            logger.exception("%s: %s failed", self._name, msg.subject)
            reply, headers = error_reply(PlatformError(f"{self._name} failed: {type(exc).__name__}"))
        if not msg.reply:
            return
        try:
            await self._nc.publish(msg.reply, reply, headers=headers)
        except nats.errors.Error as exc:
            logger.warning("%s: could not answer %s: %s", self._name, msg.subject, exc)
