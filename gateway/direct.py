"""Direct sessions at the gateway (`sdk.direct` tells the whole story): open, relay, close.

The gateway does not choose the worker: the leader scheduler does (`sched.direct.open`), from the
view it places jobs with, so a session's slot and the jobs' slots are counted by one writer. The
gateway authenticates the client, signs the session token with the platform's key (derived from the
master key, so every gateway signs alike), and keeps the key's public half in the workers' runtime
config (`_defaults.session_key`), which is how a worker checks tokens offline.

A relayed request (`POST .../run`, for HTTP clients) reads the session from the log, mints a token for
it and forwards the request to the worker: no scheduler, no append. A close asks the worker for the
session's usage and appends `DirectSessionClosed` at the session's sequence, so a session closes once
however many closers race (an expiry in the scheduler, an owner's DELETE).
"""

from __future__ import annotations

import logging
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from gateway.jobs import new_id, require_connected
from gateway.kv import Bucket
from sdk import subjects
from sdk.connection import request
from sdk.direct import (
    DirectRequest,
    DirectResult,
    DirectSession,
    DirectSessionView,
    OpenSession,
    PlaceSession,
    SessionClaims,
    SessionClosedView,
    SessionPlaced,
    closing,
    end_on_worker,
    load_session,
    public_key_hex,
    sign_token,
)
from sdk.errors import SessionEnded, SessionNotFound, Timeout, Unavailable
from sdk.events import now_ms
from sdk.log import WrongLastSequence, append
from sdk.worker_config import parse_partial

logger = logging.getLogger(__name__)

#: How long the gateway waits for the leader scheduler to place a session.
PLACE_TIMEOUT_S = 5.0
#: The longest one relayed request may take.
RUN_TIMEOUT_S = 300.0


class DirectCommands:
    """The gateway's direct-session commands (a part of `gateway.service.Gateway`)."""

    nc: NatsClient
    js: JetStreamContext
    config_bucket: Bucket
    #: Signs session tokens; its public half is in the workers' config.
    session_signer: Ed25519PrivateKey

    async def publish_session_key(self) -> None:
        """Put the platform's public session key into `_defaults` (once; every gateway derives the same)."""
        key = public_key_hex(self.session_signer)

        def change(defaults: dict[str, Any] | None) -> dict[str, Any] | None:
            defaults = defaults or {}
            return None if defaults.get("session_key") == key else {**defaults, "session_key": key}

        if await self.config_bucket.update(
            subjects.WORKER_CONFIG_DEFAULTS_KEY, parse_partial, change, what="the session key"
        ) is not None:
            logger.info("published the direct-session key to the workers' config")

    async def open_session(self, req: OpenSession, owner: str) -> DirectSessionView:
        """Lease a worker's slot (the leader scheduler places the session and logs it), then sign its token."""
        require_connected(self.nc)
        session_id = new_id()
        place = PlaceSession(session_id=session_id, owner=owner, request=req)
        try:
            placed = await request(self.nc, subjects.SCHED_DIRECT_OPEN, place, SessionPlaced, timeout_s=PLACE_TIMEOUT_S)
        except Timeout:  # schedulers listen, but none leads now (a take-over in progress)
            raise Unavailable("no scheduler leader answered; nothing was opened, retry", {"retry_after_s": 1}) from None
        claims = SessionClaims(
            session_id=session_id, worker_id=placed.worker_id, expires_at_ms=placed.expires_at_ms,
            job_type=req.type, model=req.model,
        )
        logger.info("direct session %s of %s opened on worker %s", session_id, owner, placed.worker_id)
        return DirectSessionView(
            session_id=session_id, worker_id=placed.worker_id, region=placed.region,
            subject=subjects.direct_subject(placed.worker_id), token=sign_token(self.session_signer, claims),
            expires_at_ms=placed.expires_at_ms,
        )

    async def session(self, session_id: str, owner: str | None) -> DirectSession:
        """The session as the log has it; `SessionNotFound` when there is none, or it is another client's
        (`owner` None: an operator, who sees every session)."""
        session = await load_session(self.js, session_id)
        if session is None or owner not in (None, session.owner):
            raise SessionNotFound(f"direct session {session_id} not found")
        return session

    async def run_direct(self, session_id: str, params: dict[str, Any], owner: str | None) -> DirectResult:
        """Relay one request to the session's worker, as the SDK over NATS would send it."""
        session = await self.session(session_id, owner)
        remaining_s = (session.expires_at_ms - now_ms()) / 1000
        if session.closed is not None or remaining_s <= 0:
            reason = session.closed.reason if session.closed is not None else "expired"
            raise SessionEnded(f"direct session {session_id} is over ({reason}); open another", {"reason": reason})
        req = DirectRequest(token=sign_token(self.session_signer, SessionClaims.of(session)), params=params)
        try:
            return await request(
                self.nc, subjects.direct_subject(session.worker_id), req, DirectResult,
                timeout_s=min(remaining_s, RUN_TIMEOUT_S),
            )
        except Unavailable:
            raise SessionEnded(
                f"worker {session.worker_id} of session {session_id} is gone; open another", {"reason": "worker_gone"}
            ) from None

    async def close_session(self, session_id: str, owner: str | None, closed_by: str) -> SessionClosedView:
        """End the session (its owner or an operator); closing a closed session answers how it ended."""
        require_connected(self.nc)
        session = await self.session(session_id, owner)
        if session.closed is None:
            usage = await end_on_worker(self.nc, session.worker_id, session.id, "closed")
            event = closing(session, "closed", usage, closed_by=closed_by)
            try:
                await append(self.js, subjects.session_subject(session.id), event, expected_seq=session.seq)
                logger.info("direct session %s closed by %s", session.id, closed_by)
            except WrongLastSequence:
                pass  # closed meanwhile (expired, its worker lost): the log says how
            session = await self.session(session_id, owner)
        return session.closed_view()
