"""Token families: what API keys and workers share. A family is a login session: its access tokens are
self-contained (claims + MAC), its refresh tokens a counter kept in the `auth` bucket.

Decisions, and why:
- Verifying an access token reads no bucket. The one question a MAC cannot answer (revoked since?) is
  answered from `RevocationCache`, an in-memory mirror of the `revoked.>` keys kept current by a KV
  watch; the gateway that revokes sees it at once, the others within the watch's delivery time.
- Only the family's current counter refreshes; presenting a spent one means two parties hold the chain,
  so the whole family is revoked (reuse detection). Two concurrent refreshes of one token race on the
  family record's revision, and the loser counts as a reuse, which is what it is.
- Every family record and revocation marker carries a TTL (the refresh token's, the access token's plus
  the skew margin): the server forgets it once nothing it could answer for is alive, so the bucket stays
  bounded by the rate of sign-ins, not by the platform's age.
- Gateways' clocks differ: a subject revocation also stops tokens issued up to `clock_skew_s` after its
  instant (nothing legitimate is issued for a revoked key then), and the issuing side reads its clock
  before it loads the key, so a token is never stamped later than the check that allowed it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import msgspec
from nats.js import JetStreamContext

from gateway.auth import records
from gateway.auth.master_key import MASTER_KEY_BYTES, derive_key
from gateway.auth.records import (
    ApiKeyRecord,
    EnrollmentRecord,
    FamilyRecord,
    Revocation,
    WorkerRecord,
    apikey_key,
    family_key,
    family_revocation_key,
    worker_key,
)
from gateway.auth.revocations import RevocationCache
from gateway.auth.tokens import (
    AccessClaims,
    Kind,
    Principal,
    Role,
    digest,
    digest_matches,
    mint_access,
    mint_refresh,
    new_secret_token,
    read_access,
    read_refresh,
    split_secret_token,
)
from gateway.auth.worker_records import WorkerRecords
from gateway.kv import Bucket, Versioned
from sdk import subjects
from sdk.api import TokenPair
from sdk.errors import PlatformError
from sdk.events import now_ms
from sdk.signing import AuthReason, refused

logger = logging.getLogger(__name__)

Clock = Callable[[], int]
Revocable = TypeVar("Revocable", ApiKeyRecord, WorkerRecord)
#: Records of a secret token that is stored as its digest.
Digested = TypeVar("Digested", ApiKeyRecord, EnrollmentRecord)

#: How often `verify_access` sweeps the revocation cache.
PRUNE_INTERVAL_MS = 60_000


class AuthSettings(msgspec.Struct, frozen=True, kw_only=True):
    access_ttl_s: float = 15 * 60.0
    refresh_ttl_s: float = 7 * 86400.0
    #: How long a rotated worker's previous secret and access tokens keep verifying.
    rotation_grace_s: float = 60.0
    #: Signed worker requests are accepted within this many seconds of the gateway's clock.
    replay_window_s: float = 60.0
    #: A worker's credentials older than this are rotated (the worker is told at its next heartbeat).
    worker_credentials_max_age_s: float = 86400.0
    #: Gateways' clocks differ by up to this much; revocations and record TTLs allow for it.
    clock_skew_s: float = 60.0


class TokenFamilies:
    """The shared core of `Credentials`: the bucket, the derived keys, the clock, and token families."""

    def __init__(
        self, bucket: Bucket, master_key: bytes, *, settings: AuthSettings = AuthSettings(), clock: Clock = now_ms
    ) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ValueError(f"the master key must be {MASTER_KEY_BYTES} bytes, not {len(master_key)}")
        durations = msgspec.structs.asdict(settings)
        if any(value <= 0 for value in durations.values()):
            raise ValueError(f"every auth setting must be positive, got {durations}")
        self._bucket = bucket
        self._master_key = master_key
        self._access_key = derive_key(master_key, "access-token")
        self._refresh_key = derive_key(master_key, "refresh-token")
        self._digest_key = derive_key(master_key, "stored-digest")
        self._clock = clock
        self.settings = settings
        self.access_ttl_ms = int(settings.access_ttl_s * 1000)
        self.refresh_ttl_ms = int(settings.refresh_ttl_s * 1000)
        self.rotation_grace_ms = int(settings.rotation_grace_s * 1000)
        self.worker_max_age_ms = int(settings.worker_credentials_max_age_s * 1000)
        self.skew_ms = int(settings.clock_skew_s * 1000)
        # A marker outlives every token it could stop, wherever that token was stamped.
        self._marker_retain_ms = self.access_ttl_ms + 2 * self.skew_ms
        self._revocations = RevocationCache(bucket.kv, retain_ms=self._marker_retain_ms, skew_ms=self.skew_ms)
        self._worker_records = WorkerRecords(bucket.kv)
        self._pruned_at_ms = 0

    @classmethod
    async def _bucket_for(cls, js: JetStreamContext) -> Bucket:
        bucket = await Bucket.open(js, subjects.AUTH_BUCKET)
        await bucket.allow_ttl()
        return bucket

    async def close(self) -> None:
        await self._revocations.stop()
        await self._worker_records.stop()

    # --- Refresh and verification ----------------------------------------------------------------

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Rotate the pair: the presented refresh token is spent, a new one is current."""
        family_id, counter = read_refresh(self._refresh_key, refresh_token)
        now = self._clock()

        def spend(family: FamilyRecord | None) -> FamilyRecord:
            if family is None:
                raise refused(AuthReason.UNKNOWN, "unknown token family")
            if family.revoked_at_ms is not None:
                raise refused(AuthReason.REVOKED, f"token family revoked ({family.revoked_reason})")
            if counter != family.counter:
                raise _Reused(family)
            if now >= family.refresh_expires_at_ms:
                raise refused(AuthReason.EXPIRED, "refresh token expired")
            return msgspec.structs.replace(
                family, counter=family.counter + 1, refresh_expires_at_ms=now + self.refresh_ttl_ms
            )

        try:
            changed = await self._bucket.update(
                family_key(family_id), records.family_decoder.decode, spend,
                ttl_s=self._family_ttl_s, what=f"token family {family_id}",
            )
        except _Reused as reused:
            family = reused.family
            await self._revoke_family(family_id, now, "refresh token reused")
            # The ids say whose session it was; the token itself is never logged.
            logger.warning(
                "refresh token reuse in family %s of %s %s: family revoked", family_id, family.kind, family.subject
            )
            raise refused(AuthReason.REUSED, "refresh token already used; the session is revoked, sign in again") from None
        assert changed is not None
        await self._require_active_subject(changed.after)
        logger.info("refreshed family %s of %s %s", family_id, changed.after.kind, changed.after.subject)
        return self._pair(changed.after, now)

    def verify_access(self, token: str) -> Principal:
        """The principal of a valid access token; `Unauthorized` with reason `malformed`,
        `bad_signature`, `expired` or `revoked` otherwise. Reads no bucket."""
        now = self._clock()
        claims = read_access(self._access_key, token, now)
        if now - self._pruned_at_ms > PRUNE_INTERVAL_MS:
            self._revocations.prune(now)
            self._pruned_at_ms = now
        if self._revocations.revoked(claims, now):
            raise refused(AuthReason.REVOKED, "access token revoked")
        return Principal(subject=claims.sub, kind=claims.kind, role=claims.role, family=claims.fam)

    def verify_authorization(self, header: str | None) -> Principal:
        """`verify_access` for an `Authorization: Bearer <token>` header value (HTTP and NATS alike)."""
        scheme, _, token = (header or "").partition(" ")
        if not header:
            raise refused(AuthReason.MISSING_HEADER, f"missing header {subjects.AUTH_HEADER}")
        if scheme.lower() != "bearer" or not token:
            raise refused(AuthReason.MALFORMED, f"{subjects.AUTH_HEADER} must be `Bearer <access token>`")
        return self.verify_access(token.strip())

    async def _revoke_record(self, key: str, decode: Callable[[bytes], Revocable], missing: PlatformError) -> Revocable:
        """Mark an API key's or a worker's record revoked now, and return it; a record already revoked
        is returned as it is, so revoking again repeats what follows (the markers), never fails early."""
        now = self._clock()
        seen: list[Revocable] = []

        def revoke(record: Revocable | None) -> Revocable | None:
            if record is None:
                raise missing
            seen.append(record)
            return None if record.revoked_at_ms is not None else msgspec.structs.replace(record, revoked_at_ms=now)

        changed = await self._bucket.update(key, decode, revoke, what=key)
        return changed.after if changed is not None else seen[-1]

    # --- Secrets stored as digests (API keys, enrollment tokens) -----------------------------------

    def _new_secret(self, prefix: str) -> tuple[str, str, str]:
        """A fresh `(id, token, digest)`: the token is handed out once, only the digest is stored."""
        token_id, token = new_secret_token(prefix)
        return token_id, token, digest(self._digest_key, token)

    def _secret_matches(self, token: str, stored_digest: str) -> bool:
        return digest_matches(self._digest_key, token, stored_digest)

    async def _load_secret(
        self, token: str, prefix: str, what: str, key_of: Callable[[str], str], decode: Callable[[bytes], Digested]
    ) -> tuple[str, Versioned[Digested]]:
        """The id of a secret token (`what`: its name in refusals) and its stored record, when the token
        matches the stored digest; `Unauthorized` (malformed, or unknown) otherwise."""
        token_id = split_secret_token(token, prefix, what)
        loaded = await self._bucket.load(key_of(token_id), decode)
        if loaded is None or not self._secret_matches(token, loaded.value.digest):
            raise refused(AuthReason.UNKNOWN, f"unknown {what}")
        return token_id, loaded

    # --- Families ----------------------------------------------------------------------------------

    async def _family(self, family_id: str, subject: str, kind: Kind, role: Role, now: int) -> FamilyRecord:
        """The family `family_id`, created at counter 0 if it does not exist yet."""
        family = FamilyRecord(
            family=family_id,
            subject=subject,
            kind=kind,
            role=role,
            counter=0,
            refresh_expires_at_ms=now + self.refresh_ttl_ms,
            created_at_ms=now,
        )
        if await self._bucket.create(family_key(family_id), family, ttl_s=self._family_ttl_s(family)) is None:
            existing = await self._bucket.load(family_key(family_id), records.family_decoder.decode)
            if existing is not None:
                return existing.value
        return family

    def _family_ttl_s(self, family: FamilyRecord) -> float:
        """A family record matters until its refresh token expires (a spent one must still be recognised)."""
        return (family.refresh_expires_at_ms - self._clock() + self.skew_ms) / 1000

    def _pair(self, family: FamilyRecord, now: int) -> TokenPair:
        claims = AccessClaims(
            sub=family.subject,
            kind=family.kind,
            role=family.role,
            fam=family.family,
            iat_ms=now,
            exp_ms=now + self.access_ttl_ms,
        )
        return TokenPair(
            access_token=mint_access(self._access_key, claims),
            refresh_token=mint_refresh(self._refresh_key, family.family, family.counter),
            expires_in_s=self.access_ttl_ms / 1000,
            refresh_expires_in_s=(family.refresh_expires_at_ms - now) / 1000,
        )

    async def _require_active_subject(self, family: FamilyRecord) -> None:
        """A family outlives nothing it was issued for: a revoked key or a rotated worker ends it."""
        if family.kind == "client":
            key = await self._bucket.load(apikey_key(family.subject), records.apikey_decoder.decode)
            active = key is not None and key.value.revoked_at_ms is None
        else:
            worker = await self._bucket.load(worker_key(family.subject), records.worker_decoder.decode)
            active = (
                worker is not None
                and worker.value.revoked_at_ms is None
                and family.family in (worker.value.family, worker.value.pending_family)
            )
        if not active:
            raise refused(AuthReason.REVOKED, f"the {family.kind} {family.subject} behind this token is revoked")

    async def _revoke_family(
        self, family_id: str, now: int, reason: str, *, tokens_until_ms: int | None = None
    ) -> None:
        """Its refresh token stops now; its access tokens at `tokens_until_ms` (default: now)."""
        marker = Revocation(at_ms=now if tokens_until_ms is None else tokens_until_ms, reason=reason)
        known = self._revocations.marker(family_revocation_key(family_id))
        # An earlier instant is the stronger revocation (a worker revoked during its rotation grace).
        if known is None or marker.at_ms < known.at_ms:
            await self._mark(family_revocation_key(family_id), marker)

        def revoke(family: FamilyRecord | None) -> FamilyRecord | None:
            if family is None or family.revoked_at_ms is not None:
                return None
            return msgspec.structs.replace(family, revoked_at_ms=now, revoked_reason=reason)

        changed = await self._bucket.update(
            family_key(family_id), records.family_decoder.decode, revoke,
            ttl_s=self._family_ttl_s, what=f"token family {family_id}",
        )
        if changed is not None:
            family = changed.after
            logger.info("revoked token family %s of %s %s: %s", family_id, family.kind, family.subject, reason)

    async def _mark(self, key: str, revocation: Revocation) -> None:
        """Write a revocation marker, kept (by its TTL) until every token it could stop has expired."""
        ttl_s = (revocation.at_ms + self._marker_retain_ms - self._clock()) / 1000
        await self._bucket.write(key, revocation, ttl_s=ttl_s)
        self._revocations.add(key, revocation)


class _Reused(Exception):
    """A spent refresh token was presented: raised out of the compare-and-set, handled by `refresh`."""

    def __init__(self, family: FamilyRecord) -> None:
        super().__init__(family.family)
        self.family = family
