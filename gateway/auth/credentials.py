"""The credentials service: API keys, access and refresh tokens, worker enrollment, rotation, and the
verification of signed worker requests. A thin layer over the `auth` bucket (see `records.py`).

Decisions, and why:
- Access tokens are self-contained (claims + MAC), so verifying one reads no bucket. The one question a
  MAC cannot answer (revoked since?) is answered from `RevocationCache`, an in-memory mirror of the
  `revoked.>` keys kept current by a KV watch; the gateway that revokes sees it at once, the others
  within the watch's delivery time (milliseconds).
- Refresh tokens are a family id, a counter and a MAC. Only the family's current counter refreshes;
  presenting a spent one means two parties hold the chain, so the whole family is revoked (reuse
  detection). Two concurrent refreshes of the same token race on the family record's revision, and the
  loser counts as a reuse, which is what it is.
- Worker secrets are derived: HMAC(master key, "worker:<id>:<generation>"). Rotation bumps the
  generation; the previous secret and the previous access tokens keep verifying for
  `rotation_grace_s` (requests signed just before the worker switched are still in flight), the
  previous refresh token dies at once.
- Nothing secret is stored: API keys and enrollment tokens as keyed digests, the rest derived.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TypeVar, get_args

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import InvalidKeyError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gateway.auth import records
from gateway.auth.master_key import MASTER_KEY_BYTES, derive_key, worker_secret
from gateway.auth.records import (
    ApiKeyRecord,
    EnrollmentRecord,
    FamilyRecord,
    Revocation,
    WorkerRecord,
    apikey_key,
    enroll_key,
    family_key,
    family_revocation_key,
    subject_revocation_key,
    worker_key,
)
from gateway.auth.replay import NonceWindow
from gateway.auth.revocations import RevocationCache
from gateway.auth.tokens import (
    API_KEY_PREFIX,
    ENROLLMENT_PREFIX,
    AccessClaims,
    Kind,
    Principal,
    Role,
    digest,
    digest_matches,
    mint_access,
    mint_refresh,
    new_family_id,
    new_secret_token,
    read_access,
    read_refresh,
    split_secret_token,
)
from sdk import subjects
from sdk.api import ApiKeyInfo, ApiKeyRole, Token, TokenPair, WorkerCredentials, convert
from sdk.errors import BadRequest, Conflict, PlatformError, WorkerNotFound
from sdk.events import now_ms
from sdk.signing import WORKER_ID_HEADER, AuthReason, forbidden, read_headers, refused, signature_matches

logger = logging.getLogger(__name__)

Clock = Callable[[], int]
T = TypeVar("T")

API_KEY_ROLES: tuple[str, ...] = get_args(ApiKeyRole)
#: Gateways' clocks differ a little; a revocation marker is kept this much longer than strictly needed.
CLOCK_SKEW_MS = 60_000
#: How often `verify_access` sweeps the revocation cache.
PRUNE_INTERVAL_MS = 60_000
#: Compare-and-set retries on one record before giving up with `Conflict`.
CAS_ATTEMPTS = 5
#: Signed requests whose subject ends in the worker id.
_WORKER_SUBJECT_PREFIXES = (
    f"{subjects.API_WORKERS_REPORT_PREFIX}.",
    f"{subjects.API_WORKERS_HEARTBEAT_PREFIX}.",
    f"{subjects.API_WORKERS_ROTATE_PREFIX}.",
)


class AuthSettings(msgspec.Struct, frozen=True, kw_only=True):
    access_ttl_s: float = 15 * 60.0
    refresh_ttl_s: float = 7 * 86400.0
    #: How long a rotated worker's previous secret and access tokens keep verifying.
    rotation_grace_s: float = 60.0
    #: Signed worker requests are accepted within this many seconds of the gateway's clock.
    replay_window_s: float = 60.0
    #: A worker's credentials older than this are rotated (the worker is told at its next heartbeat).
    worker_credentials_max_age_s: float = 86400.0


class Credentials:
    def __init__(
        self,
        kv: KeyValue,
        master_key: bytes,
        *,
        settings: AuthSettings = AuthSettings(),
        clock: Clock = now_ms,
    ) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ValueError(f"the master key must be {MASTER_KEY_BYTES} bytes, not {len(master_key)}")
        durations = msgspec.structs.asdict(settings)
        if any(value <= 0 for value in durations.values()):
            raise ValueError(f"every auth setting must be positive, got {durations}")
        self._kv = kv
        self._master_key = master_key
        self._access_key = derive_key(master_key, "access-token")
        self._refresh_key = derive_key(master_key, "refresh-token")
        self._digest_key = derive_key(master_key, "stored-digest")
        self._clock = clock
        self.access_ttl_ms = int(settings.access_ttl_s * 1000)
        self.refresh_ttl_ms = int(settings.refresh_ttl_s * 1000)
        self.rotation_grace_ms = int(settings.rotation_grace_s * 1000)
        self.worker_max_age_ms = int(settings.worker_credentials_max_age_s * 1000)
        self.nonces = NonceWindow(settings.replay_window_s)
        self._revocations = RevocationCache(kv, retain_ms=self.access_ttl_ms + CLOCK_SKEW_MS)
        self._pruned_at_ms = 0

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        master_key: bytes,
        *,
        settings: AuthSettings = AuthSettings(),
        clock: Clock = now_ms,
    ) -> Credentials:
        """The service on the `auth` bucket (created by `sdk.log.ensure_streams`), revocations loaded."""
        credentials = cls(await js.key_value(subjects.AUTH_BUCKET), master_key, settings=settings, clock=clock)
        await credentials._revocations.start()
        return credentials

    async def close(self) -> None:
        await self._revocations.stop()

    async def __aenter__(self) -> Credentials:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- API keys --------------------------------------------------------------------------------

    async def create_api_key(self, name: str, role: ApiKeyRole = "client") -> tuple[str, str]:
        """A new API key as `(key_id, plaintext)`; the plaintext is shown once and never stored."""
        if role not in API_KEY_ROLES:
            raise BadRequest(f"role must be one of {', '.join(API_KEY_ROLES)}, not {role!r}")
        if not 0 < len(name) <= 200:
            raise BadRequest("an API key's name must be 1 to 200 characters")
        key_id, key = new_secret_token(API_KEY_PREFIX)
        record = ApiKeyRecord(
            key_id=key_id, name=name, role=role, digest=digest(self._digest_key, key), created_at_ms=self._clock()
        )
        await self._kv.create(apikey_key(key_id), records.encoder.encode(record))
        logger.info("created API key %s (%r, role %s)", key_id, name, role)
        return key_id, key

    async def list_api_keys(self) -> list[ApiKeyInfo]:
        keys = [records.apikey_decoder.decode(value) for value in await self._values(records.APIKEY_PREFIX)]
        return [
            ApiKeyInfo(
                key_id=k.key_id, name=k.name, role=k.role, created_at_ms=k.created_at_ms, revoked_at_ms=k.revoked_at_ms
            )
            for k in sorted(keys, key=lambda k: (k.created_at_ms, k.key_id))
        ]

    async def revoke_api_key(self, key_id: str) -> None:
        """Refuse the key from now on, and every access token issued for it so far."""
        for _ in range(CAS_ATTEMPTS):
            loaded = await self._load(apikey_key(key_id), records.apikey_decoder)
            if loaded is None:
                raise BadRequest(f"no API key {key_id}")
            record, revision = loaded
            if record.revoked_at_ms is not None:
                return
            now = self._clock()
            revoked = msgspec.structs.replace(record, revoked_at_ms=now)
            if await self._swap(apikey_key(key_id), revoked, revision):
                marker = Revocation(at_ms=now, reason="API key revoked")
                await self._mark(subject_revocation_key("client", key_id), marker)
                logger.info("revoked API key %s (%r)", key_id, record.name)
                return
        raise Conflict(f"API key {key_id} kept changing")

    # --- Access and refresh tokens ---------------------------------------------------------------

    async def issue_tokens(self, api_key: str) -> TokenPair:
        """Exchange an API key for a new token family's first pair."""
        key_id = split_secret_token(api_key, API_KEY_PREFIX, "API key")
        loaded = await self._load(apikey_key(key_id), records.apikey_decoder)
        if loaded is None:
            raise refused(AuthReason.UNKNOWN, "unknown API key")
        record, _ = loaded
        if not digest_matches(self._digest_key, api_key, record.digest):
            raise refused(AuthReason.BAD_SIGNATURE, "invalid API key")
        if record.revoked_at_ms is not None:
            raise refused(AuthReason.REVOKED, "API key revoked")
        now = self._clock()
        family = await self._new_family(new_family_id(), key_id, "client", record.role, now)
        logger.info("issued tokens to API key %s (family %s)", key_id, family.family)
        return self._pair(family, now)

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Rotate the pair: the presented refresh token is spent, a new one is current."""
        family_id, counter = read_refresh(self._refresh_key, refresh_token)
        for _ in range(CAS_ATTEMPTS):
            loaded = await self._load(family_key(family_id), records.family_decoder)
            if loaded is None:
                raise refused(AuthReason.UNKNOWN, "unknown token family")
            family, revision = loaded
            now = self._clock()
            if family.revoked_at_ms is not None:
                raise refused(AuthReason.REVOKED, f"token family revoked ({family.revoked_reason})")
            if counter != family.counter:
                await self._revoke_family(family_id, now, "refresh token reused")
                # The ids say whose session it was; the token itself is never logged.
                logger.warning(
                    "refresh token reuse in family %s of %s %s: family revoked", family_id, family.kind, family.subject
                )
                raise refused(AuthReason.REUSED, "refresh token already used; the session is revoked, sign in again")
            if now >= family.refresh_expires_at_ms:
                raise refused(AuthReason.EXPIRED, "refresh token expired")
            await self._require_active_subject(family)
            rotated = msgspec.structs.replace(
                family, counter=family.counter + 1, refresh_expires_at_ms=now + self.refresh_ttl_ms
            )
            if await self._swap(family_key(family_id), rotated, revision):
                logger.info("refreshed family %s of %s %s", family_id, family.kind, family.subject)
                return self._pair(rotated, now)
        raise Conflict(f"token family {family_id} kept changing")

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

    # --- Workers ---------------------------------------------------------------------------------

    async def create_enrollment_token(self, ttl_s: float = 3600.0, *, worker_id: str | None = None) -> str:
        """A one-use token that enrolls a new worker, or (with `worker_id`) re-enrolls that worker."""
        if ttl_s <= 0:
            raise BadRequest("an enrollment token's ttl_s must be positive")
        if worker_id is not None:
            worker_id = convert(worker_id, Token)
        token_id, token = new_secret_token(ENROLLMENT_PREFIX)
        record = EnrollmentRecord(
            token_id=token_id,
            digest=digest(self._digest_key, token),
            expires_at_ms=self._clock() + int(ttl_s * 1000),
            worker_id=worker_id,
        )
        await self._kv.create(enroll_key(token_id), records.encoder.encode(record))
        logger.info("created enrollment token %s (ttl %.0f s, worker %s)", token_id, ttl_s, worker_id or "any new")
        return token

    async def enroll(self, token: str, worker_id: str) -> WorkerCredentials:
        """Spend an enrollment token on `worker_id`; returns the worker's credentials, once."""
        worker_id = convert(worker_id, Token)
        token_id = split_secret_token(token, ENROLLMENT_PREFIX, "enrollment token")
        loaded = await self._load(enroll_key(token_id), records.enrollment_decoder)
        if loaded is None or not digest_matches(self._digest_key, token, loaded[0].digest):
            raise refused(AuthReason.UNKNOWN, "unknown enrollment token")
        enrollment, revision = loaded
        now = self._clock()
        if enrollment.used_at_ms is not None:
            raise refused(AuthReason.ALREADY_USED, "enrollment token already used")
        if now >= enrollment.expires_at_ms:
            raise refused(AuthReason.EXPIRED, "enrollment token expired")
        if enrollment.worker_id not in (None, worker_id):
            raise forbidden(AuthReason.WORKER_MISMATCH, f"this enrollment token is for worker {enrollment.worker_id}")
        existing = await self._load(worker_key(worker_id), records.worker_decoder)
        if existing is not None and existing[0].revoked_at_ms is None and enrollment.worker_id is None:
            # Otherwise any enrollment token would let its holder take over a running worker's identity.
            raise Conflict(
                f"worker {worker_id} is already enrolled: revoke it, or use an enrollment token created for it"
            )
        used = msgspec.structs.replace(enrollment, used_at_ms=now, used_by=worker_id)
        if not await self._swap(enroll_key(token_id), used, revision):
            raise refused(AuthReason.ALREADY_USED, "enrollment token already used")
        generation = existing[0].generation + 1 if existing is not None else 1
        record = WorkerRecord(
            worker_id=worker_id, generation=generation, family=new_family_id(), enrolled_at_ms=now, generation_at_ms=now
        )
        # Revision 0 means "must not exist": two tokens racing for one new id cannot both win.
        if not await self._swap(worker_key(worker_id), record, existing[1] if existing is not None else 0):
            raise Conflict(f"worker {worker_id} changed during its enrollment; try again with a new token")
        if existing is not None:
            await self._revoke_worker_families(existing[0], now, "worker enrolled again")
        logger.info("enrolled worker %s (generation %d) with enrollment token %s", worker_id, generation, token_id)
        return await self._worker_credentials(record, now)

    async def rotate_worker(self, worker_id: str) -> WorkerCredentials:
        """New secret and tokens (generation + 1). The previous secret and access tokens verify for
        `rotation_grace_s` more; the previous refresh token stops at once."""
        for _ in range(CAS_ATTEMPTS):
            record, revision = await self._worker_record(worker_id)
            now = self._clock()
            rotated = msgspec.structs.replace(
                record,
                generation=record.generation + 1,
                family=new_family_id(),
                previous_generation=record.generation,
                previous_family=record.family,
                previous_valid_until_ms=now + self.rotation_grace_ms,
                generation_at_ms=now,
                rotation_requested_at_ms=None,
            )
            if await self._swap(worker_key(worker_id), rotated, revision):
                await self._revoke_family(
                    record.family, now, "worker credentials rotated", tokens_until_ms=rotated.previous_valid_until_ms
                )
                logger.info(
                    "rotated worker %s to generation %d; generation %d verifies for %d ms more",
                    worker_id,
                    rotated.generation,
                    record.generation,
                    self.rotation_grace_ms,
                )
                return await self._worker_credentials(rotated, now)
        raise Conflict(f"worker {worker_id} kept changing")

    async def request_rotation(self, worker_id: str) -> None:
        """Mark the worker's credentials for rotation; the gateway tells the worker at its next
        heartbeat, and the worker asks for them (so only the worker ever receives its secret)."""
        for _ in range(CAS_ATTEMPTS):
            record, revision = await self._worker_record(worker_id)
            requested = msgspec.structs.replace(record, rotation_requested_at_ms=self._clock())
            if await self._swap(worker_key(worker_id), requested, revision):
                logger.info("rotation of worker %s requested (generation %d)", worker_id, record.generation)
                return
        raise Conflict(f"worker {worker_id} kept changing")

    async def rotation_due(self, worker_id: str) -> bool:
        """Whether the worker should rotate now: an operator asked, or its generation is older than
        `worker_credentials_max_age_s`."""
        record, _ = await self._worker_record(worker_id)
        issued_at_ms = record.generation_at_ms or record.enrolled_at_ms
        return record.rotation_requested_at_ms is not None or self._clock() - issued_at_ms >= self.worker_max_age_ms

    async def revoke_worker(self, worker_id: str) -> None:
        """Refuse the worker's signatures and tokens from now on; enrolling it again needs a token for it."""
        for _ in range(CAS_ATTEMPTS):
            loaded = await self._load(worker_key(worker_id), records.worker_decoder)
            if loaded is None:
                raise WorkerNotFound(f"worker {worker_id} is not enrolled")
            record, revision = loaded
            if record.revoked_at_ms is not None:
                return
            now = self._clock()
            if await self._swap(worker_key(worker_id), msgspec.structs.replace(record, revoked_at_ms=now), revision):
                await self._revoke_worker_families(record, now, "worker revoked")
                logger.info("revoked worker %s", worker_id)
                return
        raise Conflict(f"worker {worker_id} kept changing")

    async def worker_secret(self, worker_id: str) -> bytes:
        """The worker's current HMAC secret; `Unauthorized` when it is unknown or revoked."""
        record, _ = await self._worker_record(worker_id)
        return worker_secret(self._master_key, worker_id, record.generation)

    async def verify_report(
        self, subject: str, body: bytes, headers: Mapping[str, str] | None, now_ms: int | None = None
    ) -> str:
        """Check a signed worker request on a subject that ends in the worker id (report, heartbeat,
        rotate) and return the worker id. In order: the worker id header equals the subject's worker
        (`Forbidden`), the worker is enrolled and not revoked, the signature, the replay window and the
        nonce (`Unauthorized` with the reason)."""
        return await self._verify_signed(subject, body, headers, now_ms, from_subject=True)

    async def verify_signed(
        self, subject: str, body: bytes, headers: Mapping[str, str] | None, now_ms: int | None = None
    ) -> str:
        """`verify_report` for a subject that does not name the worker (a returning worker's
        registration, its config read): the worker is the one the `X-Worker-Id` header names."""
        return await self._verify_signed(subject, body, headers, now_ms, from_subject=False)

    async def _verify_signed(
        self, subject: str, body: bytes, headers: Mapping[str, str] | None, now_ms: int | None, *, from_subject: bool
    ) -> str:
        now = self._clock() if now_ms is None else now_ms
        try:
            signed = read_headers(headers)
            worker_id = _subject_worker(subject) if from_subject else convert(signed.worker_id, Token)
            if signed.worker_id != worker_id:
                raise forbidden(
                    AuthReason.WORKER_MISMATCH,
                    f"{WORKER_ID_HEADER} {signed.worker_id!r} does not match the subject's worker {worker_id!r}",
                )
            record, _ = await self._worker_record(worker_id)
            if not any(signature_matches(secret, subject, body, signed) for secret in self._secrets(record, now)):
                raise refused(AuthReason.BAD_SIGNATURE, f"bad signature from worker {worker_id}")
            self.nonces.check(worker_id, signed.timestamp_ms, signed.nonce, now)
        except PlatformError as exc:
            logger.warning("refused signed request on %s: %s", subject, exc.message)
            raise
        return worker_id

    # --- Internals -------------------------------------------------------------------------------

    def _secrets(self, record: WorkerRecord, now: int) -> list[bytes]:
        """The secrets a request from this worker may be signed with right now."""
        current = [worker_secret(self._master_key, record.worker_id, record.generation)]
        if record.previous_generation is not None and now <= record.previous_valid_until_ms:
            return current + [worker_secret(self._master_key, record.worker_id, record.previous_generation)]
        return current

    async def _worker_record(self, worker_id: str) -> tuple[WorkerRecord, int]:
        loaded = await self._load(worker_key(worker_id), records.worker_decoder)
        if loaded is None:
            raise refused(AuthReason.UNKNOWN, f"worker {worker_id} is not enrolled")
        if loaded[0].revoked_at_ms is not None:
            raise refused(AuthReason.REVOKED, f"worker {worker_id} is revoked")
        return loaded

    async def _worker_credentials(self, record: WorkerRecord, now: int) -> WorkerCredentials:
        family = await self._new_family(record.family, record.worker_id, "worker", "worker", now)
        pair = self._pair(family, now)
        return WorkerCredentials(
            worker_id=record.worker_id,
            access_token=pair.access_token,
            refresh_token=pair.refresh_token,
            hmac_secret_hex=worker_secret(self._master_key, record.worker_id, record.generation).hex(),
            generation=record.generation,
            expires_in_s=pair.expires_in_s,
            refresh_expires_in_s=pair.refresh_expires_in_s,
        )

    async def _new_family(self, family_id: str, subject: str, kind: Kind, role: Role, now: int) -> FamilyRecord:
        family = FamilyRecord(
            family=family_id,
            subject=subject,
            kind=kind,
            role=role,
            counter=0,
            refresh_expires_at_ms=now + self.refresh_ttl_ms,
            created_at_ms=now,
        )
        await self._kv.create(family_key(family_id), records.encoder.encode(family))
        return family

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
            key = await self._load(apikey_key(family.subject), records.apikey_decoder)
            active = key is not None and key[0].revoked_at_ms is None
        else:
            worker = await self._load(worker_key(family.subject), records.worker_decoder)
            active = worker is not None and worker[0].revoked_at_ms is None and worker[0].family == family.family
        if not active:
            raise refused(AuthReason.REVOKED, f"the {family.kind} {family.subject} behind this token is revoked")

    async def _revoke_worker_families(self, record: WorkerRecord, now: int, reason: str) -> None:
        """The current family, and the previous one if it is still in its rotation grace: nothing is left."""
        await self._revoke_family(record.family, now, reason)
        if record.previous_family is not None:
            await self._revoke_family(record.previous_family, now, reason)

    async def _revoke_family(
        self, family_id: str, now: int, reason: str, *, tokens_until_ms: int | None = None
    ) -> None:
        """Its refresh token stops now; its access tokens at `tokens_until_ms` (default: now)."""
        marker = Revocation(at_ms=now if tokens_until_ms is None else tokens_until_ms, reason=reason)
        known = self._revocations.marker(family_revocation_key(family_id))
        # An earlier instant is the stronger revocation (a worker revoked during its rotation grace).
        if known is None or marker.at_ms < known.at_ms:
            await self._mark(family_revocation_key(family_id), marker)
        for _ in range(CAS_ATTEMPTS):
            loaded = await self._load(family_key(family_id), records.family_decoder)
            if loaded is None or loaded[0].revoked_at_ms is not None:
                return
            family, revision = loaded
            revoked = msgspec.structs.replace(family, revoked_at_ms=now, revoked_reason=reason)
            if await self._swap(family_key(family_id), revoked, revision):
                logger.info("revoked token family %s of %s %s: %s", family_id, family.kind, family.subject, reason)
                return
        raise Conflict(f"token family {family_id} kept changing")

    async def _mark(self, key: str, revocation: Revocation) -> None:
        await self._kv.put(key, records.encoder.encode(revocation))
        self._revocations.add(key, revocation)

    async def _load(self, key: str, decoder: msgspec.json.Decoder[T]) -> tuple[T, int] | None:
        """A record and its revision (for compare-and-set), or None."""
        try:
            entry = await self._kv.get(key)
        except (KeyNotFoundError, InvalidKeyError):
            return None
        return decoder.decode(entry.value or b""), entry.revision or 0

    async def _swap(self, key: str, record: msgspec.Struct, revision: int) -> bool:
        """Write `record` if the key is still at `revision`; False when another writer got there first."""
        try:
            await self._kv.update(key, records.encoder.encode(record), last=revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def _values(self, prefix: str) -> list[bytes]:
        watcher = await self._kv.watch(f"{prefix}>", ignore_deletes=True)
        values: list[bytes] = []
        while (entry := await watcher.updates()) is not None:
            values.append(entry.value or b"")
        await watcher.stop()
        return values


def _subject_worker(subject: str) -> str:
    for prefix in _WORKER_SUBJECT_PREFIXES:
        if subject.startswith(prefix) and "." not in subject[len(prefix) :]:
            return subject[len(prefix) :]
    raise BadRequest(f"{subject} is not a worker report, heartbeat or rotate subject")
