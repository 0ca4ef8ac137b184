"""Signed worker requests: the canonical string, the signature headers, signing and verifying.

A worker signs every report and heartbeat it sends with its HMAC secret; the gateway verifies the
signature before it looks at the body. Both sides use this one module, so the canonical string cannot
drift between them:

    subject "\\n" reply "\\n" timestamp_ms "\\n" nonce "\\n" sha256_hex(body)

The subject binds the signature to the worker (report subjects end in the worker id) and to the kind
of request; the timestamp and nonce let the gateway refuse replays (`gateway.auth.NonceWindow`). The
reply subject is signed for the requests whose answer carries credentials (`issues_credentials`:
registration, rotation), so a captured request cannot be sent again with the answer redirected to
someone else's inbox; for the others it is empty (they are sent with nats-py's shared reply inbox,
whose subject the sender does not know in advance).

Auth failures carry a machine-readable `AuthReason` in `details["reason"]`, so a client can tell an
expired token (refresh and retry) from a revoked one (give up).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from enum import StrEnum

import msgspec

from sdk import subjects
from sdk.errors import Forbidden, Unauthorized

#: The worker the request claims to come from; must equal the worker id at the end of the subject.
WORKER_ID_HEADER = "X-Worker-Id"
#: When the worker signed (Unix ms); outside the gateway's replay window the request is refused.
TIMESTAMP_HEADER = "X-Timestamp-Ms"
#: A random value, never repeated within the replay window.
NONCE_HEADER = "X-Nonce"
#: Lowercase hex HMAC-SHA256 of the canonical string.
SIGNATURE_HEADER = "X-Signature"

#: Longer nonces buy nothing and would let a sender grow the gateway's nonce memory.
MAX_NONCE_CHARS = 128
#: A signed request's body is refused above this size before it is hashed: hashing is the work a
#: forger could make the gateway do for free. Larger data travels as an object, not a request.
MAX_SIGNED_BODY_BYTES = 1024 * 1024
#: Unix milliseconds, in ASCII digits only (`str.isdigit` also accepts "²", which `int` refuses).
_TIMESTAMP = re.compile(r"[0-9]{1,16}")


class AuthReason(StrEnum):
    """Why a credential was refused; travels in `Unauthorized.details["reason"]`."""

    #: A required header (or the Authorization header) is absent.
    MISSING_HEADER = "missing_header"
    #: The credential does not parse (wrong prefix, bad encoding, non-numeric timestamp).
    MALFORMED = "malformed"
    #: The signature or MAC does not match: forged, or signed with another secret.
    BAD_SIGNATURE = "bad_signature"
    #: The token or enrollment token is past its expiry; a client may refresh.
    EXPIRED = "expired"
    #: The key, token family or worker was revoked.
    REVOKED = "revoked"
    #: The key, token family or worker does not exist.
    UNKNOWN = "unknown"
    #: A refresh token was presented after it had been rotated away; its family is now revoked.
    REUSED = "reused"
    #: A one-use enrollment token was presented again.
    ALREADY_USED = "already_used"
    #: The signed timestamp is outside the replay window.
    STALE_TIMESTAMP = "stale_timestamp"
    #: The nonce was already seen within the replay window.
    REPLAYED_NONCE = "replayed_nonce"
    #: The credential names another worker than the one it is used for.
    WORKER_MISMATCH = "worker_mismatch"


def refused(reason: AuthReason, message: str) -> Unauthorized:
    """An `Unauthorized` carrying its reason, for the SDK and the logs."""
    return Unauthorized(message, {"reason": reason.value})


def forbidden(reason: AuthReason, message: str) -> Forbidden:
    return Forbidden(message, {"reason": reason.value})


class SignedHeaders(msgspec.Struct, frozen=True, kw_only=True):
    """The signature headers of one request, parsed."""

    worker_id: str
    timestamp_ms: int
    nonce: str
    signature: str


def body_sha256_hex(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def issues_credentials(subject: str) -> bool:
    """Registration and rotation: their answers hand out or re-admit credentials, so their reply subject
    is signed and their nonces are shared by every gateway."""
    return subject == subjects.API_WORKERS_REGISTER or subject.startswith(f"{subjects.API_WORKERS_ROTATE_PREFIX}.")


def canonical_string(subject: str, timestamp_ms: int, nonce: str, body: bytes, *, reply: str = "") -> bytes:
    return _canonical(subject, reply, timestamp_ms, nonce, body_sha256_hex(body))


def _canonical(subject: str, reply: str, timestamp_ms: int, nonce: str, body_hash: str) -> bytes:
    # Only the requests that issue credentials sign their reply subject (see the module's docstring).
    signed_reply = reply if issues_credentials(subject) else ""
    return f"{subject}\n{signed_reply}\n{timestamp_ms}\n{nonce}\n{body_hash}".encode()


def signature_hex(secret: bytes, subject: str, timestamp_ms: int, nonce: str, body: bytes, *, reply: str = "") -> str:
    canonical = canonical_string(subject, timestamp_ms, nonce, body, reply=reply)
    return hmac.new(secret, canonical, hashlib.sha256).hexdigest()


def sign(
    secret: bytes,
    subject: str,
    body: bytes,
    *,
    reply: str = "",
    worker_id: str | None = None,
    now_ms: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The four signature headers for a request on `subject` with `body`, answered on `reply` (signed
    when the request `issues_credentials`).

    `worker_id` defaults to the subject's last token: report and heartbeat subjects end in the worker id.
    """
    timestamp_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    nonce = secrets.token_hex(16) if nonce is None else nonce
    return {
        WORKER_ID_HEADER: subject.rsplit(".", 1)[-1] if worker_id is None else worker_id,
        TIMESTAMP_HEADER: str(timestamp_ms),
        NONCE_HEADER: nonce,
        SIGNATURE_HEADER: signature_hex(secret, subject, timestamp_ms, nonce, body, reply=reply),
    }


def read_headers(headers: Mapping[str, str] | None) -> SignedHeaders:
    """Parse the signature headers; names match case-insensitively (HTTP lowercases them, NATS does not)."""
    by_name = {name.lower(): value for name, value in (headers or {}).items()}
    values: dict[str, str] = {}
    for name in (WORKER_ID_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER):
        value = by_name.get(name.lower())
        if not value:
            raise refused(AuthReason.MISSING_HEADER, f"missing header {name}")
        values[name] = value
    timestamp = values[TIMESTAMP_HEADER]
    if not _TIMESTAMP.fullmatch(timestamp):
        raise refused(AuthReason.MALFORMED, f"{TIMESTAMP_HEADER} must be Unix milliseconds")
    if len(values[NONCE_HEADER]) > MAX_NONCE_CHARS:
        raise refused(AuthReason.MALFORMED, f"{NONCE_HEADER} is longer than {MAX_NONCE_CHARS} characters")
    return SignedHeaders(
        worker_id=values[WORKER_ID_HEADER],
        timestamp_ms=int(timestamp),
        nonce=values[NONCE_HEADER],
        signature=values[SIGNATURE_HEADER],
    )


def signed_by(
    secrets_: list[bytes], subject: str, body: bytes, signed: SignedHeaders, *, reply: str = ""
) -> int | None:
    """The index of the secret in `secrets_` that signed the request, or None. The body is hashed once,
    whatever the number of candidate secrets."""
    canonical = _canonical(subject, reply, signed.timestamp_ms, signed.nonce, body_sha256_hex(body))
    # On bytes: compare_digest refuses str with non-ASCII characters, and headers come from outside.
    presented = signed.signature.lower().encode()
    matched = None
    for index, secret in enumerate(secrets_):
        expected = hmac.new(secret, canonical, hashlib.sha256).hexdigest().encode()
        # Constant time, and every candidate is computed, so timing says nothing about which one matched.
        if hmac.compare_digest(expected, presented) and matched is None:
            matched = index
    return matched


def verify_signature(
    secret: bytes, subject: str, body: bytes, headers: Mapping[str, str] | None, *, reply: str = ""
) -> None:
    """Raise `Unauthorized` (reason `missing_header`, `malformed` or `bad_signature`) unless `headers`
    carry a valid signature of `subject` and `body` (and `reply`) by `secret`. Freshness is the caller's."""
    if signed_by([secret], subject, body, read_headers(headers), reply=reply) is None:
        raise refused(AuthReason.BAD_SIGNATURE, f"bad signature on {subject}")
