"""Workers whose NATS connection closed and did not open again: lost after one heartbeat interval instead
of three missed heartbeats (docs/reliability.md, "A worker's loss, told by its connection").

The gateway forwards nats-server's connection advisories of workers (`gateway.bus.advisories`). A SIGKILLed
worker's connection closes at once; a worker that only lost its connection for a moment (a network blip,
its server's restart) opens a new one, through the auth callout, within a fraction of a second. So a
worker is lost when its latest connection closed at least one heartbeat interval ago, no new connection
of it was opened since, and no heartbeat of it was stored since (the notice of a reconnect may be lost
with a gateway: a heartbeat says the same). Anything else, a notice that never came included, leaves
the three missed heartbeats (`scheduler.view.LOST_AFTER_MISSED_HEARTBEATS`) to decide.

Every scheduler, leader or standby, follows the notices, so a standby that takes over knows them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from scheduler.view import SchedulerView, TrackedWorker
from sdk import subjects
from sdk.events import WorkerConnection, worker_connection_decoder

logger = logging.getLogger(__name__)


class WorkerConnections:
    """The workers' connections as the notices tell them (pure: `follow` feeds it from NATS)."""

    def __init__(self) -> None:
        #: worker id -> the connection (server id, client id) its latest open notice named.
        self._open: dict[str, tuple[str, int]] = {}
        #: worker id -> the notice of its closed connection and when it arrived (local monotonic seconds).
        self._closed: dict[str, tuple[WorkerConnection, float]] = {}
        self._sub: Subscription | None = None

    async def follow(self, nc: NatsClient, on_change: Callable[[], None]) -> None:
        """Apply every notice from now on; `on_change` after each."""

        async def on_notice(msg: Msg) -> None:
            try:
                notice = worker_connection_decoder.decode(msg.data)
            except msgspec.DecodeError as exc:
                logger.warning("ignoring an unreadable worker connection notice: %s", exc)
                return
            self.apply(notice, time.monotonic())
            on_change()

        self._sub = await nc.subscribe(subjects.WORKER_CONNECTION, cb=on_notice)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):  # a connection that is gone took its subscription
                await self._sub.unsubscribe()

    def apply(self, notice: WorkerConnection, now_s: float) -> None:
        connection = (notice.server_id, notice.client_id)
        if notice.connected:
            self._open[notice.worker_id] = connection
            self._closed.pop(notice.worker_id, None)
        elif self._open.get(notice.worker_id, connection) == connection:
            # Its latest connection (or one opened before we listened); an older one that a server noticed
            # closing only after the worker had reconnected elsewhere changes nothing.
            self._open.pop(notice.worker_id, None)
            self._closed[notice.worker_id] = (notice, now_s)

    def closed(self, view: SchedulerView, now_s: float) -> list[tuple[TrackedWorker, float]]:
        """Alive workers whose connection closed more than a heartbeat interval ago and that neither
        connected nor sent a heartbeat since, with the seconds since the close reached us."""
        out = []
        for worker_id, (notice, received_s) in list(self._closed.items()):
            worker = view.workers.get(worker_id)
            if worker is None or not worker.alive or worker.heartbeat_at_us > notice.at_us:
                del self._closed[worker_id]  # lost or gone already, or heard from since
                continue
            closed_s = now_s - received_s
            if closed_s > view.heartbeat_interval_s(worker):
                out.append((worker, closed_s))
        return out

    def forget(self, worker_id: str) -> None:
        """Declared lost: its registration brings it back, not an old closed connection."""
        self._closed.pop(worker_id, None)
