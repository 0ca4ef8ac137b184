"""What the `auth` bucket holds: one key per credential, none of them secret.

| key                        | record             | why it exists                                             |
| -------------------------- | ------------------ | --------------------------------------------------------- |
| `apikey.<key_id>`          | `ApiKeyRecord`     | the keyed digest of an API key, its name and role         |
| `family.<family>`          | `FamilyRecord`     | a login session: which refresh counter is current         |
| `enroll.<token_id>`        | `EnrollmentRecord` | a one-use enrollment token's digest, expiry and use       |
| `worker.<worker_id>`       | `WorkerRecord`     | a worker's credential generation (its secret is derived)  |
| `revoked.family.<family>`  | `Revocation`       | access tokens of that family stop verifying               |
| `revoked.client.<key_id>`  | `Revocation`       | access tokens issued for that API key until then stop     |
| `nonce.<worker_id>.<hash>` | `NonceRecord`      | a credential-issuing request's nonce, seen by any gateway |

Revocations get their own keys so every gateway can watch just them (`revoked.>`) and verify access
tokens without reading the bucket per request.

What expires (a per-record TTL, so the server forgets it and the bucket stays bounded): a family when
its refresh token would have, an enrollment token after its expiry, a revocation marker once every
token it could stop has expired, a nonce after the replay window. API keys and worker records stay
(one per key or worker an operator created).
"""

from __future__ import annotations

import hashlib

import msgspec

from gateway.auth.tokens import Kind, Role
from sdk.subjects import Names

#: The key families of the table above; a family's `below` is what a watch of all its keys reads.
API_KEYS = Names("apikey")
WORKER_RECORDS = Names("worker")
REVOKED = Names("revoked")
apikey_key = API_KEYS.of
family_key = Names("family").of
enroll_key = Names("enroll").of
worker_key = WORKER_RECORDS.of
family_revocation_key = Names(f"{REVOKED.prefix}.family").of


class ApiKeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    name: str
    role: Role
    digest: str
    created_at_ms: int
    revoked_at_ms: int | None = None


class FamilyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A chain of refresh tokens; only the one with `counter` is current, earlier ones are spent."""

    family: str
    subject: str
    kind: Kind
    role: Role
    counter: int
    refresh_expires_at_ms: int
    created_at_ms: int
    revoked_at_ms: int | None = None
    revoked_reason: str | None = None


class EnrollmentRecord(msgspec.Struct, frozen=True, kw_only=True):
    token_id: str
    digest: str
    expires_at_ms: int
    #: When set, the token may only enroll this worker id (re-enrolling a known worker needs this).
    worker_id: str | None = None
    used_at_ms: int | None = None
    used_by: str | None = None


class WorkerRecord(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    #: The current secret is derived from (master key, worker id, generation).
    generation: int
    family: str
    enrolled_at_ms: int
    #: When the current generation was issued (0 for records written before rotation was scheduled:
    #: `enrolled_at_ms` then).
    generation_at_ms: int = 0
    #: An operator asked for a rotation; the worker is told at its next heartbeat.
    rotation_requested_at_ms: int | None = None
    #: Issued by a rotation but not used yet: it verifies beside the current one, and becomes current
    #: (promoted) on its first signed use; a worker whose rotate reply was lost is sent it again.
    pending_generation: int | None = None
    pending_family: str | None = None
    #: After a promotion, the previous generation's secret and tokens still verify until this instant.
    previous_generation: int | None = None
    previous_family: str | None = None
    previous_valid_until_ms: int = 0
    revoked_at_ms: int | None = None


class Revocation(msgspec.Struct, frozen=True, kw_only=True):
    #: For a family: tokens stop verifying from this instant (later than now during a rotation's grace).
    #: For a subject: tokens issued at or before this instant stop verifying.
    at_ms: int
    reason: str


class NonceRecord(msgspec.Struct, frozen=True, kw_only=True):
    subject: str
    timestamp_ms: int


def subject_revocation_key(kind: Kind, subject: str) -> str:
    """Workers need none: a worker has one live family at a time, so revoking it is revoking the family."""
    return f"{REVOKED.prefix}.{kind}.{subject}"


def nonce_key(worker_id: str, nonce: str) -> str:
    """Hashed: a nonce is whatever the sender chose, a KV key allows only a few characters."""
    return f"nonce.{worker_id}.{hashlib.sha256(nonce.encode()).hexdigest()[:32]}"


apikey_decoder = msgspec.json.Decoder(ApiKeyRecord)
family_decoder = msgspec.json.Decoder(FamilyRecord)
enrollment_decoder = msgspec.json.Decoder(EnrollmentRecord)
worker_decoder = msgspec.json.Decoder(WorkerRecord)
revocation_decoder = msgspec.json.Decoder(Revocation)
