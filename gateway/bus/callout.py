"""The NATS auth callout: nats-server asks `$SYS.REQ.USER.AUTH` who a connecting worker or client is,
and the gateway answers with a user JWT naming that principal's own subjects (`permissions.py`), or
with a refusal. The platform's own users (`platform`, `system`) never come here (`auth_users`).

The story of one connect: decode the server's request (a JWT signed by the server), read the
credential in the connect options (`sdk.bus`), verify it with the gateway's `Credentials`, pick the
permissions, remember the connection under the principal, answer. Revocation stays immediate: when a
worker is revoked (`WorkerDeregistered`, reason `revoked`) or a key or token family is revoked (a
`revoked.>` marker in the auth bucket), every connection this gateway admitted for it is closed with
the system account's `$SYS.REQ.SERVER.<id>.KICK`; the client's reconnect asks again and is refused.
JWTs also expire (an hour; an access token's own expiry), so a connection whose kick was lost ends anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from typing import Any

import msgspec
import nkeys
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from gateway.auth import Credentials
from gateway.auth.records import REVOKED, family_revocation_key, subject_revocation_key
from gateway.auth.tokens import ACCESS_PREFIX, API_KEY_PREFIX, ENROLLMENT_PREFIX
from gateway.bus import jwt
from gateway.bus.permissions import client_permissions, enrolling_permissions, worker_permissions
from sdk import subjects
from sdk.bus import WORKER_PROOF_PREFIX, read_worker_proof
from sdk.errors import PlatformError
from sdk.events import WorkerDeregistered, worker_event_decoder
from sdk.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

#: Every gateway replica answers callouts; one answer per connect.
CALLOUT_QUEUE = "gateway-callout"
#: A worker's or API key's identity lasts this long; the reconnect that follows asks again.
IDENTITY_TTL_S = 3600
#: An enrolling machine has this long to register.
ENROLLING_TTL_S = 600
#: Connections remembered per principal for kicks (older ones have ended or will expire).
CONNECTIONS_PER_PRINCIPAL = 32
REVOKED_REASON = "revoked"


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """Who a connection is, what it may do, and which revocations end it."""

    name: str
    permissions: jwt.Permissions
    expires_at_s: int
    #: Keys under which this connection is remembered: `worker:<id>` and the auth bucket's revocation keys.
    ended_by: tuple[str, ...]


class Connection(msgspec.Struct, frozen=True):
    server_id: str
    client_id: int


class BusAuthority:
    """Answers the auth callout, and closes the connections of what gets revoked."""

    def __init__(
        self, nc: NatsClient, credentials: Credentials, issuer: nkeys.KeyPair, system: NatsClient | None
    ) -> None:
        self._nc = nc
        self._credentials = credentials
        self._issuer = issuer
        #: A connection as the system account's user, for kicks; None where the server has none for us.
        self._system = system
        self._connections: defaultdict[str, deque[Connection]] = defaultdict(
            lambda: deque(maxlen=CONNECTIONS_PER_PRINCIPAL)
        )
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: KeyValue.KeyWatcher | None = None
        #: Connect round trips answered and their mean cost, for the logs and the benchmark.
        self.answered = 0
        self.answer_s_total = 0.0

    async def start(self) -> None:
        self._subs.append(
            await self._nc.subscribe(subjects.AUTH_CALLOUT_SUBJECT, queue=CALLOUT_QUEUE, cb=self._spawn_answer)
        )
        self._subs.append(await self._nc.subscribe(subjects.worker_subject("*"), cb=self._on_worker_event))
        kv = await self._nc.jetstream().key_value(subjects.AUTH_BUCKET)
        self._watcher = await kv.watch(REVOKED.below, ignore_deletes=True, include_history=False)
        self._tasks.add(asyncio.create_task(self._follow_revocations(self._watcher)))
        logger.info("answering the NATS auth callout")

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()
        if self._watcher is not None:
            await self._watcher.stop()
        await cancel_and_wait(*self._tasks)

    # --- Answering -------------------------------------------------------------------------------

    async def _spawn_answer(self, msg: Msg) -> None:
        # Callbacks of one subscription run one at a time; a KV read must not hold up other connects.
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        started = time.perf_counter()
        try:
            request = jwt.decode(msg.data.decode())
            nats = request["nats"]
            user_nkey, server_id = nats["user_nkey"], nats["server_id"]["id"]
        except (jwt.InvalidJwt, KeyError, TypeError, UnicodeDecodeError) as exc:
            logger.warning("ignoring an unreadable auth callout request: %s", exc)
            return
        if request["iss"] != server_id:
            logger.warning("ignoring an auth callout request not signed by its server %s", server_id)
            return
        try:
            identity = await self.identify(nats.get("connect_opts") or {})
        except PlatformError as exc:
            logger.warning("refused a NATS connection from %s: %s", _peer(nats), exc.message)
            await msg.respond(jwt.encode(jwt.response_claims(user_nkey, server_id, error=exc.message), self._issuer).encode())
            return
        connection = Connection(server_id, int(nats.get("client_info", {}).get("id", 0)))
        for key in identity.ended_by:
            self._connections[key].append(connection)
        user = jwt.encode(jwt.user_claims(user_nkey, identity.name, identity.permissions, identity.expires_at_s), self._issuer)
        await msg.respond(jwt.encode(jwt.response_claims(user_nkey, server_id, user_jwt=user), self._issuer).encode())
        self.answered += 1
        self.answer_s_total += time.perf_counter() - started
        logger.info("NATS connection %s admitted as %s", connection.client_id, identity.name)

    async def identify(self, connect_opts: dict[str, Any]) -> Identity:
        """The identity the credential in `connect_opts` proves; `Unauthorized` (with the reason) if none."""
        token = str(connect_opts.get("auth_token") or "")
        now_s = int(time.time())
        if token.startswith(WORKER_PROOF_PREFIX):
            worker_id = await self._credentials.verify_signed(
                subjects.NATS_CONNECT_SUBJECT, b"", read_worker_proof(token)
            )
            return Identity(
                name=f"worker:{worker_id}",
                permissions=worker_permissions(worker_id),
                expires_at_s=now_s + IDENTITY_TTL_S,
                ended_by=(f"worker:{worker_id}",),
            )
        if token.startswith(ENROLLMENT_PREFIX):
            token_id = await self._credentials.check_enrollment(token)
            prefix = subjects.credential_inbox_prefix(subjects.ENROLL_INBOX_ROOT, token)
            return Identity(
                name=f"enrolling:{token_id}",
                permissions=enrolling_permissions(prefix),
                expires_at_s=now_s + ENROLLING_TTL_S,
                ended_by=(),
            )
        if token.startswith(API_KEY_PREFIX) or token.startswith(ACCESS_PREFIX):
            by_key = token.startswith(API_KEY_PREFIX)
            principal = (
                await self._credentials.verify_api_key(token) if by_key else self._credentials.verify_access(token)
            )
            if principal.kind != "client":
                raise PlatformError("a worker connects with its connect proof, not an access token")
            prefix = subjects.credential_inbox_prefix(subjects.CLIENT_INBOX_ROOT, token)
            ended_by = [subject_revocation_key("client", principal.subject)]
            if not by_key:
                ended_by.append(family_revocation_key(principal.family))
            ttl_s = IDENTITY_TTL_S if by_key else int(self._credentials.access_ttl_ms / 1000)
            return Identity(
                name=f"client:{principal.subject}",
                permissions=client_permissions(prefix, operator=principal.role == "operator"),
                expires_at_s=now_s + ttl_s,
                ended_by=tuple(ended_by),
            )
        raise PlatformError("connect with a worker's proof, an enrollment token, an API key or an access token")

    # --- Revocation ------------------------------------------------------------------------------

    async def _on_worker_event(self, msg: Msg) -> None:
        try:
            event = worker_event_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        if isinstance(event, WorkerDeregistered) and event.reason == REVOKED_REASON:
            await self.kick(f"worker:{event.worker_id}")

    async def _follow_revocations(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None:
                await self.kick(entry.key)

    async def kick(self, key: str) -> int:
        """Close every connection remembered under `key`; how many the servers closed."""
        connections = self._connections.pop(key, None)
        if not connections:
            return 0
        if self._system is None:
            logger.warning("cannot close the connections of %s (no system account user); they end at expiry", key)
            return 0
        closed = 0
        for connection in connections:
            try:
                reply = await self._system.request(
                    subjects.kick_subject(connection.server_id),
                    msgspec.json.encode({"cid": connection.client_id}),
                    timeout=2,
                )
            except Exception as exc:  # a server that left the cluster: its connections went with it
                logger.warning("kick of connection %s failed: %s", connection.client_id, exc)
                continue
            closed += b'"error"' not in reply.data
        logger.info("closed %d NATS connections of %s", closed, key)
        return closed


def _peer(nats: dict[str, Any]) -> str:
    info = nats.get("client_info") or {}
    return f"{info.get('host', '?')} (connection {info.get('id', '?')}, {info.get('name') or 'unnamed'})"
