"""NATS JWTs by hand (nats-io/jwt v2 shapes): the auth callout's user claims and its response, signed
with the issuer's account nkey, and the server's request, verified with the server's nkey.

A token is `base64url(header) "." base64url(claims) "." base64url(ed25519 signature of the first two)`,
with the header `{"typ":"JWT","alg":"ed25519-nkey"}` and no padding. The claims carry `iss` (the
signer's public nkey), `sub`, `aud`, `iat`, `exp`, `jti` and a `nats` object whose `type` names the
claim (`user`, `authorization_request`, `authorization_response`).
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

import msgspec
import nacl.exceptions
import nacl.signing
import nkeys

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
#: The claims' format version nats-server expects (jwt v2).
CLAIMS_VERSION = 2
#: What nats-server puts in a request's `aud`.
REQUEST_AUDIENCE = "nats-authorization-request"
#: In server-config mode a user JWT's `aud` names the account to place the user in: the global one.
GLOBAL_ACCOUNT = "$G"

_json = msgspec.json.Encoder()


class InvalidJwt(ValueError):
    """A token that does not parse, or whose signature does not verify."""


class Permissions(msgspec.Struct, frozen=True, kw_only=True):
    """What one identity may publish and subscribe to."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    #: May answer the requests it receives (any number of messages per request, for streamed answers,
    #: within `RESPONSE_TTL_S`), without a publish permission on the requesters' inboxes.
    allow_responses: bool = False


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(claims: dict[str, Any], issuer: nkeys.KeyPair) -> str:
    """Sign `claims` as `issuer`: sets `iss`, `iat` and `jti` (a hash of the rest, as nats-io/jwt does)."""
    body = {**claims, "iss": issuer.public_key.decode(), "iat": int(time.time())}
    body["jti"] = base64.b32encode(hashlib.sha256(_json.encode(body)).digest()).decode().rstrip("=")
    signed = f"{_b64(_json.encode(HEADER))}.{_b64(_json.encode(body))}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


def decode(token: str) -> dict[str, Any]:
    """The claims of a token signed by the public nkey in its own `iss` (the caller checks who that is)."""
    try:
        header, claims, signature = token.split(".")
        if msgspec.json.decode(_unb64(header)) != HEADER:
            raise InvalidJwt(f"unexpected JWT header {_unb64(header)!r}")
        body = msgspec.json.decode(_unb64(claims))
        _verify_key(body["iss"]).verify(f"{header}.{claims}".encode(), _unb64(signature))
    except (ValueError, KeyError, TypeError, msgspec.DecodeError, nacl.exceptions.BadSignatureError) as exc:
        raise InvalidJwt(f"not a valid NATS JWT: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidJwt("JWT claims must be an object")
    return body


#: How long after a request its receiver may still answer (a direct LLM request streams its text).
RESPONSE_TTL_S = 600


def user_claims(user_nkey: str, name: str, permissions: Permissions, expires_at_s: int) -> dict[str, Any]:
    """A user in the global account with exactly `permissions`, until `expires_at_s` (the server closes
    the connection then, and the client's reconnect asks the callout again)."""
    nats: dict[str, Any] = {
        "pub": {"allow": list(permissions.publish)},
        "sub": {"allow": list(permissions.subscribe)},
        **({"resp": {"max": -1, "ttl": RESPONSE_TTL_S * 1_000_000_000}} if permissions.allow_responses else {}),
        "subs": -1,
        "data": -1,
        "payload": -1,
        "type": "user",
        "version": CLAIMS_VERSION,
    }
    return {"sub": user_nkey, "aud": GLOBAL_ACCOUNT, "name": name, "exp": expires_at_s, "nats": nats}


def response_claims(user_nkey: str, server_id: str, *, user_jwt: str = "", error: str = "") -> dict[str, Any]:
    """The callout's answer to one request: the user JWT, or an error (exactly one of them)."""
    nats: dict[str, Any] = {"type": "authorization_response", "version": CLAIMS_VERSION}
    if user_jwt:
        nats["jwt"] = user_jwt
    else:
        nats["error"] = error or "not authorized"
    return {"sub": user_nkey, "aud": server_id, "exp": int(time.time()) + 60, "nats": nats}


def _verify_key(public_key: str) -> nacl.signing.VerifyKey:
    raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    if len(raw) != 35 or not nkeys.valid_public_prefix_byte(raw[0]):
        raise InvalidJwt(f"{public_key!r} is not a public nkey")
    return nacl.signing.VerifyKey(raw[1:33])
