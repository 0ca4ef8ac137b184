"""Webhooks, the receiving side's contract: how the platform signs a job's view, and how to check it.

When a job that carries `webhook_url` ends, the platform POSTs the job's view (JSON) there with the header
`Gf-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`, where the secret is the
submitting API key's (`POST /api/v1/webhooks/secret`). A receiver calls `verify_webhook` on the raw body
before trusting it; it refuses a timestamp older than 5 minutes, so a captured request cannot be replayed
later. During a rotation both secrets may be passed.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from typing import Annotated

import msgspec

from sdk.api.decoding import Strict
from sdk.subjects import WEBHOOK_SIGNATURE_HEADER

#: How old a signature may be when it is checked.
TOLERANCE_S = 300
#: The secret's prefix, so a leaked one is recognisable.
SECRET_PREFIX = "whsec_"


class InvalidWebhook(Exception):
    """The request is not a genuine, fresh webhook from the platform."""


class WebhookSecretRequest(Strict):
    #: True: replace the secret with a new one (the old one stops being used at once).
    rotate: bool = False


class WebhookSecret(msgspec.Struct, kw_only=True):
    secret: Annotated[str, msgspec.Meta(min_length=1)]
    #: Goes up by one per rotation.
    generation: int


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The `Gf-Signature` value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_webhook(
    secret: str | Iterable[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = TOLERANCE_S,
    now_s: float | None = None,
) -> None:
    """Raise `InvalidWebhook` unless `body` was signed with `secret` (or one of several) within
    `tolerance_s`; `headers` as received (any case), `body` exactly as received (not re-encoded)."""
    value = next((v for k, v in headers.items() if k.lower() == WEBHOOK_SIGNATURE_HEADER.lower()), None)
    if value is None:
        raise InvalidWebhook(f"no {WEBHOOK_SIGNATURE_HEADER} header")
    fields: dict[str, list[str]] = {}
    for part in value.split(","):
        key, _, item = part.strip().partition("=")
        fields.setdefault(key, []).append(item)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        raise InvalidWebhook(f"{WEBHOOK_SIGNATURE_HEADER} has no valid t=") from None
    age_s = (time.time() if now_s is None else now_s) - timestamp
    if age_s > tolerance_s:
        raise InvalidWebhook(f"signed {age_s:.0f}s ago, more than {tolerance_s:.0f}s")
    if age_s < -tolerance_s:
        raise InvalidWebhook("signed in the future")
    secrets = [secret] if isinstance(secret, str) else list(secret)
    expected = {signature(s, body, timestamp).partition(",v1=")[2] for s in secrets}
    if not any(hmac.compare_digest(given, want) for given in fields.get("v1", []) for want in expected):
        raise InvalidWebhook("signature does not match")
