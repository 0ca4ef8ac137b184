"""How a worker or a client proves who it is when it connects to NATS (the connecting side of the
platform's auth callout, `gateway.bus`), and the inboxes it then uses.

The proof travels as the connection's `auth_token`; nats-py asks for it again on every reconnect:
- a worker: `gfw_<worker_id>.<timestamp_ms>.<nonce>.<signature>`, a fresh signature of the pseudo-subject
  `nats.connect` with its HMAC secret (`sdk.signing`), so the secret never travels and a proof is
  stale after the replay window; its inboxes are `_INBOX_worker.<worker_id>`;
- a machine that has only an enrollment token (`gfe_...`): the token; it may only register;
- a client: its API key (`gfk_...`) or an access token (`gfa_...`, good until it expires).
A client's or enrolling machine's inboxes are named by a hash of its secret (`credential_inbox_prefix`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdk import subjects
from sdk.signing import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, WORKER_ID_HEADER, sign

#: The first characters of a worker's connect proof.
WORKER_PROOF_PREFIX = "gfw_"


def worker_proof(worker_id: str, secret: bytes) -> str:
    """A new connect proof for `worker_id` (one per connect: the gateway refuses a replayed nonce)."""
    headers = sign(secret, subjects.NATS_CONNECT_SUBJECT, b"", worker_id=worker_id)
    parts = (headers[WORKER_ID_HEADER], headers[TIMESTAMP_HEADER], headers[NONCE_HEADER], headers[SIGNATURE_HEADER])
    return WORKER_PROOF_PREFIX + ".".join(parts)


def read_worker_proof(proof: str) -> dict[str, str]:
    """A connect proof as the signature headers `Credentials.verify_signed` checks (empty when it does
    not parse: the check then refuses it for a missing header)."""
    parts = proof.removeprefix(WORKER_PROOF_PREFIX).split(".")
    if not proof.startswith(WORKER_PROOF_PREFIX) or len(parts) != 4:
        return {}
    return dict(zip((WORKER_ID_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER), parts, strict=True))


def worker_options(worker_id: str, secret: Callable[[], bytes]) -> dict[str, Any]:
    """nats-py connect options of a worker; `secret` is read at each (re)connect, so a rotation applies."""
    return {
        "token": lambda: worker_proof(worker_id, secret()),
        "inbox_prefix": subjects.worker_inbox_prefix(worker_id),
    }


def enrolling_options(enrollment_token: str) -> dict[str, Any]:
    """nats-py connect options of a machine that registers with an enrollment token."""
    return {
        "token": enrollment_token,
        "inbox_prefix": subjects.credential_inbox_prefix(subjects.ENROLL_INBOX_ROOT, enrollment_token),
    }


def client_options(credential: str) -> dict[str, Any]:
    """nats-py connect options of a client holding an API key (or an access token)."""
    return {
        "token": credential,
        "inbox_prefix": subjects.credential_inbox_prefix(subjects.CLIENT_INBOX_ROOT, credential),
    }


def identity_needed(url: str) -> bool:
    """Whether a connection to `url` must bring its own identity: yes, unless the URL names a user (the
    platform's services, and tests that run a worker as `platform` on a server without a gateway)."""
    return not any("@" in server for server in url.split(","))
