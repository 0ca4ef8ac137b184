"""Direct mode's contract: a client leases one slot of a warm worker and talks to it over NATS, with no
scheduler, no append and no gateway hop per request (docs/architecture.md, "Direct mode").

- Opening (`POST /api/v1/direct/sessions`, `api.direct.open`): the gateway asks the leader scheduler
  to place the session (`PlaceSession` on `sched.direct.open`); the scheduler picks the worker as it
  places jobs, counts one of its slots and appends `DirectSessionOpened`; the gateway signs the
  session token and answers `DirectSessionView`.
- Requests (`DirectRequest` on `direct.<worker_id>`) carry the token; the worker checks it offline
  with the platform's public key (its runtime config's `session_key`) and answers `DirectResult`, or
  streams `StreamChunk`s and then the result (`STREAM_END_HEADER`), as a job's stream does.
- Closing (`DELETE /api/v1/direct/sessions/{id}`, expiry, the worker lost or draining): the platform
  asks the worker for the session's usage (`EndSession` on `direct.<worker_id>.end`) and appends
  `DirectSessionClosed`, which frees the slot.

A token is `gfs1.<claims>.<signature>`: base64url JSON claims (session, worker, expiry) and the
Ed25519 signature of `gfs1.<claims>` by the platform's key. `verify_token` is the worker's whole check.
"""

from __future__ import annotations

import base64
import binascii
import functools
from typing import Annotated, Any, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from sdk import subjects
from sdk.api import ModelName, RegionPolicy, Strict, Token
from sdk.api.jobs import check_placement
from sdk.connection import request
from sdk.errors import InvalidTransition, Timeout, TokenRefused, Unavailable
from sdk.events import DirectSessionClosed, DirectSessionOpened, SessionEvent, session_event_decoder
from sdk.log import read_subject

TOKEN_PREFIX = "gfs1"
#: A session lasts at most a day; the default is ten minutes.
MAX_TTL_S = 86_400.0
DEFAULT_TTL_S = 600.0

# --- Requests and replies ----------------------------------------------------------------------------


#: What a direct session can run: the job types whose results travel inline (image results go through the
#: object store, so image work is submitted as jobs).
DirectType = Literal["echo", "llm", "embedding"]


class OpenSession(Strict):
    type: DirectType
    model: ModelName | None = None
    region: Token | None = None
    #: As a job's (`sdk.regions.effective_policy`): `nearest` when a region is set, else `any`.
    region_policy: RegionPolicy | None = None
    max_latency_ms: Annotated[float, msgspec.Meta(ge=0, le=60_000)] | None = None
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=MAX_TTL_S)] = DEFAULT_TTL_S

    def __post_init__(self) -> None:
        check_placement(self, "sessions")


class DirectSessionView(msgspec.Struct, kw_only=True):
    session_id: str
    worker_id: str
    region: str
    #: Where the requests go (`direct.<worker_id>`).
    subject: str
    #: The session token every request carries (a bearer secret: whoever holds it uses the session).
    token: str
    expires_at_ms: int


class SessionRef(Strict):
    id: Token


class RunDirect(Strict):
    """The body of `POST /api/v1/direct/sessions/{id}/run` (the gateway relays it to the worker)."""

    params: dict[str, Any] = {}


class DirectRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    token: str
    params: dict[str, Any] = {}
    #: Stream the text (`StreamChunk`s to the reply inbox) before the result.
    stream: bool = False


class DirectResult(msgspec.Struct, kw_only=True):
    result: Any = None


class EndSession(msgspec.Struct, kw_only=True):
    """The platform to a worker: the session is over; answer its usage (`SessionUsage`)."""

    session_id: str
    reason: str


class SessionUsage(msgspec.Struct, kw_only=True):
    requests: int = 0
    #: Generated tokens (an LLM result's `completion_tokens`), summed.
    tokens: int = 0
    errors: int = 0


class PlaceSession(msgspec.Struct, kw_only=True):
    """The gateway to the leader scheduler (`sched.direct.open`): place this session and log it."""

    session_id: str
    owner: str
    request: OpenSession


class SessionPlaced(msgspec.Struct, kw_only=True):
    worker_id: str
    region: str
    expires_at_ms: int


class SessionClosedView(msgspec.Struct, kw_only=True):
    """The answer to a close: how the session ended and its usage (None where the worker could not say)."""

    session_id: str
    worker_id: str
    reason: str
    requests: int | None = None
    tokens: int | None = None
    errors: int | None = None


# --- The session as a fold of its events -----------------------------------------------------------


class DirectSession(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    worker_id: str
    region: str
    job_type: str
    model: str | None
    expires_at_ms: int
    opened_at_ms: int
    closed: DirectSessionClosed | None = None
    #: Sequence of the last event on the session's subject (for expected-sequence appends).
    seq: int = 0

    def closed_view(self) -> SessionClosedView:
        assert self.closed is not None
        c = self.closed
        return SessionClosedView(
            session_id=self.id, worker_id=self.worker_id, reason=c.reason,
            requests=c.requests, tokens=c.tokens, errors=c.errors,
        )


def apply_session(state: DirectSession | None, event: SessionEvent, seq: int) -> DirectSession:
    """A session's state after `event`; a session opens once and closes once."""
    match event:
        case DirectSessionOpened() if state is None:
            return DirectSession(
                id=event.session_id, owner=event.owner, worker_id=event.worker_id, region=event.region,
                job_type=event.job_type, model=event.model, expires_at_ms=event.expires_at_ms,
                opened_at_ms=event.at_ms, seq=seq,
            )
        case DirectSessionClosed() if state is not None and state.closed is None:
            return msgspec.structs.replace(state, closed=event, seq=seq)
    raise InvalidTransition(f"session {event.session_id}: {type(event).__name__} does not apply")


async def load_session(js: JetStreamContext, session_id: str) -> DirectSession | None:
    """A session's state, folded from its subject; None when it was never opened."""
    state = None
    for data, seq in await read_subject(js, subjects.SESSIONS_STREAM, subjects.session_subject(session_id)):
        state = apply_session(state, session_event_decoder.decode(data), seq)
    return state


#: How long the platform waits for a worker's usage when it ends a session (a lost worker never answers).
END_TIMEOUT_S = 2.0


async def end_on_worker(nc: NatsClient, worker_id: str, session_id: str, reason: str) -> SessionUsage | None:
    """Tell the worker the session is over and get its usage; None when the worker does not answer."""
    try:
        return await request(
            nc, subjects.direct_end_subject(worker_id), EndSession(session_id=session_id, reason=reason),
            SessionUsage, timeout_s=END_TIMEOUT_S,
        )
    except (Unavailable, Timeout):
        return None


def closing(session: DirectSession, reason: str, usage: SessionUsage | None, closed_by: str | None = None) -> DirectSessionClosed:
    """The event that ends `session`, with the worker's usage when it gave one."""
    return DirectSessionClosed(
        session_id=session.id, worker_id=session.worker_id, reason=reason, closed_by=closed_by,
        requests=None if usage is None else usage.requests,
        tokens=None if usage is None else usage.tokens,
        errors=None if usage is None else usage.errors,
    )


# --- Session tokens ----------------------------------------------------------------------------------


class SessionClaims(msgspec.Struct, frozen=True, kw_only=True):
    """What a token binds: the session, its worker, its expiry, and what it runs (so a client cannot
    run another engine or model on its slot)."""

    session_id: str
    worker_id: str
    expires_at_ms: int
    job_type: str
    model: str | None = None

    @classmethod
    def of(cls, session: DirectSession) -> SessionClaims:
        return cls(
            session_id=session.id, worker_id=session.worker_id, expires_at_ms=session.expires_at_ms,
            job_type=session.job_type, model=session.model,
        )


_claims_decoder = msgspec.json.Decoder(SessionClaims)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_key_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes_raw().hex()


def sign_token(key: Ed25519PrivateKey, claims: SessionClaims) -> str:
    signed = f"{TOKEN_PREFIX}.{_b64(msgspec.json.encode(claims))}"
    return f"{signed}.{_b64(key.sign(signed.encode()))}"


def verify_token(public_key: str, token: str, *, worker_id: str, now_ms: int) -> SessionClaims:
    """The claims of a token the platform signed for this worker and that has not expired; else
    `TokenRefused` with the reason in `details.reason`."""
    return check_claims(read_token(public_key, token), worker_id=worker_id, now_ms=now_ms)


def read_token(public_key: str, token: str) -> SessionClaims:
    """The claims of a token signed with `public_key`'s private half (the costly half of the check, which
    a worker does once per token: `check_claims` is what every request needs)."""
    if not public_key:
        raise TokenRefused("this worker has no session key yet", {"reason": "no_key"})
    prefix, _, rest = token.partition(".")
    encoded, _, signature = rest.partition(".")
    try:
        if prefix != TOKEN_PREFIX or not signature:
            raise ValueError("not a session token")
        _public_key(public_key).verify(_unb64(signature), f"{prefix}.{encoded}".encode())
        return _claims_decoder.decode(_unb64(encoded))
    except InvalidSignature:
        raise TokenRefused("the session token's signature is not the platform's", {"reason": "signature"}) from None
    except (ValueError, binascii.Error, msgspec.DecodeError):
        raise TokenRefused("not a session token", {"reason": "malformed"}) from None


def check_claims(claims: SessionClaims, *, worker_id: str, now_ms: int) -> SessionClaims:
    """`claims` when they are for this worker and not expired; else `TokenRefused`."""
    if claims.worker_id != worker_id:
        raise TokenRefused(
            f"the session token is for worker {claims.worker_id}, not {worker_id}", {"reason": "wrong_worker"}
        )
    if claims.expires_at_ms <= now_ms:
        raise TokenRefused(f"session {claims.session_id} has expired", {"reason": "expired"})
    return claims


@functools.lru_cache(maxsize=4)
def _public_key(public_key: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key))
