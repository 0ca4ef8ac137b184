"""The web dashboard at `/dashboard` (static files: vanilla JS, no build step, nothing from a CDN), and the
live feed it reads: `GET /api/v1/live`, server-sent events of the platform for the signed-in principal.

The page holds the access token in the tab's session storage and sends it as `Authorization` on every
request, the live feed included (it reads the stream with `fetch`, not `EventSource`, which cannot send
headers: no token ever goes into a URL).

The feed's events (each `data` is JSON):
- `job`: `{job_id, seq, event}` for each event of a job the principal may see (a client its own, an
  operator every job), from an ordered consumer on JOBS that starts now;
- `worker`: `{worker_id, seq, event}` for each worker lifecycle event (operators only);
- `heartbeat`: the heartbeat as the worker sent it (operators only), so telemetry moves without polling;
- `resync`: the page fell behind (a slow reader); it reloads its lists.
Both routes are outside the OpenAPI document: the page is not API, and an endless stream is not a thing
a fuzzer can call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
from litestar import get
from litestar.di import NamedDependency
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.static_files import create_static_files_router
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from gateway.access import job_scope
from gateway.auth import Principal
from gateway.service import Gateway
from sdk import subjects
from sdk.events import JobSubmitted, heartbeat_decoder, job_event_decoder, worker_event_decoder

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
#: Events a slow page may lag behind before it is told to reload instead.
BACKLOG = 1000
#: A comment this often keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0

_json = msgspec.json.Encoder()


class _Feed:
    """One page's subscriptions; events it may see go on a bounded queue."""

    def __init__(self, gateway: Gateway, owner: str | None, operator: bool) -> None:
        self._gateway = gateway
        self._owner = owner
        self._operator = operator
        #: A client's jobs seen submitted while the feed is open (older ones: the gateway's cache).
        self._mine: set[str] = set()
        self.queue: asyncio.Queue[ServerSentEventMessage] = asyncio.Queue(BACKLOG)
        self._subs: list[Subscription] = []

    async def open(self) -> None:
        js = self._gateway.js
        feeds = [(subjects.JOBS_SUBJECTS, subjects.JOBS_STREAM, DeliverPolicy.NEW, self._on_job)]
        if self._operator:
            feeds += [
                (subjects.WORKERS_SUBJECTS, subjects.WORKERS_STREAM, DeliverPolicy.NEW, self._on_worker),
                (subjects.HEARTBEATS_SUBJECTS, subjects.HEARTBEATS_STREAM, DeliverPolicy.NEW, self._on_beat),
            ]
        for subject, stream, policy, cb in feeds:
            self._subs.append(
                await js.subscribe(subject, stream=stream, ordered_consumer=True, deliver_policy=policy, cb=cb)
            )

    async def close(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()

    def _put(self, event: str, data: bytes) -> None:
        try:
            self.queue.put_nowait(ServerSentEventMessage(event=event, data=data.decode()))
        except asyncio.QueueFull:
            self.queue = asyncio.Queue(BACKLOG)  # the page reloads its lists: what it missed no longer matters
            self.queue.put_nowait(ServerSentEventMessage(event="resync", data="{}"))

    def _visible(self, job_id: str, event: object) -> bool:
        if self._owner is None:
            return True
        if isinstance(event, JobSubmitted):
            if event.owner == self._owner:
                self._mine.add(job_id)
        elif job_id not in self._mine:
            cached = self._gateway.feed.get(job_id)
            if cached is not None and cached.owner == self._owner:
                self._mine.add(job_id)
        return job_id in self._mine

    async def _on_job(self, msg: Msg) -> None:
        event = job_event_decoder.decode(msg.data)
        if self._visible(event.job_id, event):
            self._put("job", _json.encode({"job_id": event.job_id, "seq": msg.metadata.sequence.stream, "event": event}))

    async def _on_worker(self, msg: Msg) -> None:
        event = worker_event_decoder.decode(msg.data)
        self._put("worker", _json.encode({"worker_id": event.worker_id, "seq": msg.metadata.sequence.stream, "event": event}))

    async def _on_beat(self, msg: Msg) -> None:
        self._put("heartbeat", _json.encode(heartbeat_decoder.decode(msg.data)))


@get("/api/v1/live", include_in_schema=False, media_type="text/event-stream")
async def live(gateway: NamedDependency[Gateway], principal: NamedDependency[Principal]) -> ServerSentEvent:
    """The platform's events for the caller, as server-sent events (see the module's docstring)."""
    owner = job_scope(principal)
    feed = _Feed(gateway, owner, operator=principal.role == "operator")
    await feed.open()
    logger.info("live feed opened for %s", principal.subject)

    async def events() -> AsyncIterator[ServerSentEventMessage]:
        try:
            yield ServerSentEventMessage(event="ready", data="{}")
            while True:
                try:
                    yield await asyncio.wait_for(feed.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield ServerSentEventMessage(comment="keepalive")
        finally:
            await feed.close()

    return ServerSentEvent(events())


ROUTES = [
    live,
    create_static_files_router(
        path="/dashboard", directories=[STATIC_DIR], html_mode=True, include_in_schema=False, name="dashboard"
    ),
]
