"""Token formats: pure functions that mint and read every credential string the platform hands out.

| credential       | format                            | how it is checked                                  |
| ---------------- | --------------------------------- | -------------------------------------------------- |
| API key          | `gfk_<key_id>.<32 random bytes>`  | keyed digest of the secret, stored under the id    |
| enrollment token | `gfe_<token_id>.<32 random bytes>`| keyed digest, stored under the id, used once       |
| access token     | `gfa_<claims>.<mac>`              | MAC only (self-contained), plus revocation markers |
| refresh token    | `gfr_<family>.<counter>.<mac>`    | MAC, then the family's current counter             |

The prefixes make a leaked credential recognisable (secret scanners, logs) and say which endpoint it
belongs to. Random parts and MACs are base64url without padding, which never contains a dot.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Literal

import msgspec

from sdk.signing import AuthReason, refused

API_KEY_PREFIX = "gfk_"
ENROLLMENT_PREFIX = "gfe_"
ACCESS_PREFIX = "gfa_"
REFRESH_PREFIX = "gfr_"

#: Anything longer is not ours; refusing early bounds the work an attacker can cause.
MAX_TOKEN_CHARS = 2048
SECRET_BYTES = 32
#: Ids and counters inside tokens; they become KV keys, so nothing else may pass.
_ID = re.compile(r"[0-9a-f]{1,64}")
_COUNTER = re.compile(r"[0-9]{1,12}")

#: Who a token speaks for: an API key's holder or an enrolled worker.
Kind = Literal["client", "worker"]
#: What it may do: `operator` may manage keys, workers and configuration; `client` submits jobs.
Role = Literal["client", "operator", "worker"]


class AccessClaims(msgspec.Struct, frozen=True, kw_only=True):
    """What an access token says; signed, not encrypted (it holds no secret)."""

    sub: str
    kind: Kind
    role: Role
    #: The refresh-token family the token was issued in; revoking the family revokes the token.
    fam: str
    iat_ms: int
    exp_ms: int


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """The verified caller of a request."""

    subject: str
    kind: Kind
    role: Role
    family: str


_claims_encoder = msgspec.json.Encoder()
_claims_decoder = msgspec.json.Decoder(AccessClaims)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, message: str) -> str:
    return _b64(hmac.new(key, message.encode(), hashlib.sha256).digest())


def _same(a: str, b: str) -> bool:
    # Bytes, because compare_digest refuses str with non-ASCII characters (and tokens come from outside).
    return hmac.compare_digest(a.encode(), b.encode())


def _strip_prefix(token: str, prefix: str, what: str) -> str:
    if not token.startswith(prefix) or len(token) > MAX_TOKEN_CHARS:
        raise refused(AuthReason.MALFORMED, f"malformed {what}")
    return token[len(prefix) :]


# --- Random secrets stored as digests (API keys, enrollment tokens) ------------------------------


def new_secret_token(prefix: str) -> tuple[str, str]:
    """A fresh `(id, token)`; the id is the lookup key, the rest of the token is the secret."""
    token_id = secrets.token_hex(8)
    return token_id, f"{prefix}{token_id}.{_b64(secrets.token_bytes(SECRET_BYTES))}"


def split_secret_token(token: str, prefix: str, what: str) -> str:
    """The id of a secret token; its digest is checked against the stored one with `digest_matches`."""
    token_id, dot, secret = _strip_prefix(token, prefix, what).partition(".")
    if not dot or not _ID.fullmatch(token_id) or not secret:
        raise refused(AuthReason.MALFORMED, f"malformed {what}")
    return token_id


def digest(key: bytes, token: str) -> str:
    """Keyed digest of a whole token: a copy of the bucket cannot even test guesses without the master key."""
    return _mac(key, token)


def digest_matches(key: bytes, token: str, stored: str) -> bool:
    return _same(digest(key, token), stored)


# --- Access tokens (self-contained) ---------------------------------------------------------------


def mint_access(key: bytes, claims: AccessClaims) -> str:
    payload = _b64(_claims_encoder.encode(claims))
    return f"{ACCESS_PREFIX}{payload}.{_mac(key, payload)}"


def read_access(key: bytes, token: str, now_ms: int) -> AccessClaims:
    """The claims of a genuine, unexpired access token; revocation is the caller's check."""
    payload, dot, mac = _strip_prefix(token, ACCESS_PREFIX, "access token").partition(".")
    if not dot:
        raise refused(AuthReason.MALFORMED, "malformed access token")
    # The MAC first: nothing from an unauthenticated payload is decoded.
    if not _same(_mac(key, payload), mac):
        raise refused(AuthReason.BAD_SIGNATURE, "access token has a bad signature")
    try:
        claims = _claims_decoder.decode(_unb64(payload))
    except (ValueError, msgspec.DecodeError):
        raise refused(AuthReason.MALFORMED, "malformed access token") from None
    if now_ms >= claims.exp_ms:
        raise refused(AuthReason.EXPIRED, "access token expired")
    return claims


# --- Refresh tokens (a family and a counter, MAC'd) ----------------------------------------------


def mint_refresh(key: bytes, family: str, counter: int) -> str:
    body = f"{family}.{counter}"
    return f"{REFRESH_PREFIX}{body}.{_mac(key, body)}"


def read_refresh(key: bytes, token: str) -> tuple[str, int]:
    """`(family, counter)` of a refresh token we minted; whether it is current is the family's call."""
    family, _, rest = _strip_prefix(token, REFRESH_PREFIX, "refresh token").partition(".")
    counter, _, mac = rest.partition(".")
    if not _ID.fullmatch(family) or not _COUNTER.fullmatch(counter) or not mac:
        raise refused(AuthReason.MALFORMED, "malformed refresh token")
    if not _same(_mac(key, f"{family}.{counter}"), mac):
        raise refused(AuthReason.BAD_SIGNATURE, "refresh token has a bad signature")
    return family, int(counter)


def new_family_id() -> str:
    return secrets.token_hex(12)
