"""A worker's NATS connection opening and closing, told to the schedulers at once.

A killed worker's TCP connection closes with it, and nats-server publishes a disconnect advisory
(`$SYS.ACCOUNT.$G.DISCONNECT`) in the system account. Only the system account's user can read it, and
that user may do anything there (kick any connection, read every server's events), so no scheduler gets
it: the gateway, which holds that connection already (for kicks), forwards the advisories of worker
connections as `sdk.events.WorkerConnection` on a platform subject no worker or client may publish to
(`subjects.WORKER_CONNECTION`). One gateway replica forwards each advisory (a queue group).

The worker is named by the advisory's `user`: for an identity of the auth callout, nats-server puts there
the name in the user JWT the callout signed (`worker:<id>`), not anything the client chose (its
connection name may say anything). A closed connection whose server shut down is
not forwarded: the worker did not die, it reconnects to another node.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from sdk import subjects
from sdk.events import WorkerConnection

logger = logging.getLogger(__name__)

ADVISORY_QUEUE = "gateway-advisories"
#: The callout's name for a worker's identity (`gateway.bus.callout.BusAuthority.identify`).
WORKER_NAME_PREFIX = "worker:"
#: A disconnect advisory's reason when the server itself is going away.
SERVER_SHUTDOWN = "Server Shutdown"


def worker_connection(advisory: dict[str, object], connected: bool) -> WorkerConnection | None:
    """The notice for a worker's connection advisory; None for any other connection (a client's, a
    service's) and for a server's own shutdown."""
    client = advisory.get("client")
    server = advisory.get("server")
    if not isinstance(client, dict) or not isinstance(server, dict):
        return None
    name = str(client.get("user") or "")
    reason = str(advisory.get("reason") or "")
    if not name.startswith(WORKER_NAME_PREFIX) or reason == SERVER_SHUTDOWN:
        return None
    at = dt.datetime.fromisoformat(str(advisory.get("timestamp")).replace("Z", "+00:00"))
    return WorkerConnection(
        worker_id=name.removeprefix(WORKER_NAME_PREFIX), connected=connected, server_id=str(server.get("id")),
        client_id=int(client.get("id") or 0), at_us=int(at.timestamp() * 1_000_000), reason=reason,
    )


class ConnectionAdvisories:
    """Reads the connection advisories with the system account's connection `system`, and publishes the
    workers' on the platform's connection `nc`."""

    def __init__(self, nc: NatsClient, system: NatsClient) -> None:
        self._nc = nc
        self._system = system
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        for subject in (subjects.CONNECT_ADVISORY, subjects.DISCONNECT_ADVISORY):
            self._subs.append(await self._system.subscribe(subject, queue=ADVISORY_QUEUE, cb=self._forward))
        logger.info("forwarding the workers' connection advisories to %s", subjects.WORKER_CONNECTION)

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):  # a connection that is gone took its subscription
                await sub.unsubscribe()
        self._subs.clear()

    async def _forward(self, msg: Msg) -> None:
        try:
            notice = worker_connection(json.loads(msg.data), connected=msg.subject == subjects.CONNECT_ADVISORY)
        except (ValueError, TypeError) as exc:
            logger.warning("ignoring an unreadable connection advisory: %s", exc)
            return
        if notice is None:
            return
        try:
            await self._nc.publish(subjects.WORKER_CONNECTION, msgspec.json.encode(notice))
        except nats.errors.Error as exc:
            # The schedulers' heartbeat timeout remains: a notice that does not go only makes them slower.
            logger.warning("worker %s connection notice not sent: %r", notice.worker_id, exc)
            return
        logger.info("worker %s connection %s on %s (%s)", notice.worker_id,
                    "opened" if notice.connected else "closed", notice.server_id[:8], notice.reason or "-")
