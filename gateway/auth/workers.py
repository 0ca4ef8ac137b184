"""Worker credentials: enrollment, rotation and revocation.

Decisions, and why:
- A worker's secret is derived: HMAC(master key, "worker:<id>:<generation>"), so nothing secret is
  stored, and sending a generation's credentials again sends the same secret.
- Rotation issues generation + 1 as *pending*: it verifies beside the current one and becomes current on
  its first signed use (`promote`, called by the signature check). Until then the worker is told to
  rotate at every heartbeat, and a rotate request gets the same pending generation again: a lost rotate
  reply costs one more round trip, never the worker's identity. After a promotion the previous secret
  and access tokens verify for `rotation_grace_s` more (requests signed just before the switch are in
  flight); the previous refresh token stops at once.
- A worker may only rotate when it is due (an operator asked, the generation is older than
  `worker_credentials_max_age_s`, or a pending one waits), so it cannot grow the bucket at will.
- Enrolling an id that has a worker record (running or revoked) needs a token bound to that id: an
  unbound token would otherwise take over the id, its history and its runtime overrides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from gateway.auth import records
from gateway.auth.families import TokenFamilies
from gateway.auth.master_key import worker_secret
from gateway.auth.records import EnrollmentRecord, WorkerRecord, enroll_key, worker_key
from gateway.auth.tokens import ENROLLMENT_PREFIX, new_family_id
from gateway.kv import Changed, Versioned
from sdk.api import Token, WorkerCredentials, convert
from sdk.errors import BadRequest, Conflict, WorkerNotFound
from sdk.signing import AuthReason, forbidden, refused

logger = logging.getLogger(__name__)


class Rotation(msgspec.Struct, frozen=True, kw_only=True):
    credentials: WorkerCredentials
    #: False when the pending generation was sent again (its first reply was lost): nothing new happened.
    issued: bool


class WorkerEnrollment(TokenFamilies):
    async def create_enrollment_token(self, ttl_s: float = 3600.0, *, worker_id: str | None = None) -> str:
        """A one-use token that enrolls a new worker, or (with `worker_id`) re-enrolls that worker."""
        if ttl_s <= 0:
            raise BadRequest("an enrollment token's ttl_s must be positive")
        if worker_id is not None:
            worker_id = convert(worker_id, Token)
        token_id, token, token_digest = self._new_secret(ENROLLMENT_PREFIX)
        record = EnrollmentRecord(
            token_id=token_id,
            digest=token_digest,
            expires_at_ms=self._clock() + int(ttl_s * 1000),
            worker_id=worker_id,
        )
        await self._bucket.create(enroll_key(token_id), record, ttl_s=self._enrollment_ttl_s(record))
        logger.info("created enrollment token %s (ttl %.0f s, worker %s)", token_id, ttl_s, worker_id or "any new")
        return token

    async def check_enrollment(self, token: str) -> str:
        """The id of an enrollment token that would enroll a worker now, spending nothing (the NATS auth
        callout lets its holder connect to register); `Unauthorized` with the reason otherwise."""
        token_id, _ = await self._usable_enrollment(token)
        return token_id

    async def enroll(self, token: str, worker_id: str) -> WorkerCredentials:
        """Spend an enrollment token on `worker_id`; returns the worker's credentials, once."""
        worker_id = convert(worker_id, Token)
        now = self._clock()
        token_id, loaded = await self._usable_enrollment(token, now)
        enrollment = loaded.value
        if enrollment.worker_id not in (None, worker_id):
            raise forbidden(AuthReason.WORKER_MISMATCH, f"this enrollment token is for worker {enrollment.worker_id}")
        existing = await self._bucket.load(worker_key(worker_id), records.worker_decoder.decode)
        if existing is not None and enrollment.worker_id is None:
            raise Conflict(
                f"worker {worker_id} is already enrolled (or was, and is revoked): "
                f"enroll it again with a token created for it (`gpuctl workers enroll --worker-id {worker_id}`)"
            )
        used = msgspec.structs.replace(enrollment, used_at_ms=now, used_by=worker_id)
        if await self._bucket.write(
            enroll_key(token_id), used, revision=loaded.revision, ttl_s=self._enrollment_ttl_s(used)
        ) is None:
            raise refused(AuthReason.ALREADY_USED, "enrollment token already used")
        generation = existing.value.generation + 1 if existing is not None else 1
        record = WorkerRecord(
            worker_id=worker_id, generation=generation, family=new_family_id(), enrolled_at_ms=now, generation_at_ms=now
        )
        # Revision 0 means "must not exist": two tokens racing for one new id cannot both win.
        expected = existing.revision if existing is not None else 0
        revision = await self._bucket.write(worker_key(worker_id), record, revision=expected)
        if revision is None:
            raise Conflict(f"worker {worker_id} changed during its enrollment; try again with a new token")
        self._worker_records.put(worker_id, Versioned(record, revision))
        if existing is not None:
            await self._revoke_worker_families(existing.value, now, "worker enrolled again")
        logger.info("enrolled worker %s (generation %d) with enrollment token %s", worker_id, generation, token_id)
        return await self._worker_credentials(worker_id, generation, record.family, now)

    async def rotate_worker(self, worker_id: str) -> Rotation:
        """Issue the next generation as pending (or send the pending one again); it becomes current on
        its first signed use. `Conflict` when no rotation is due."""
        now = self._clock()
        seen: list[WorkerRecord] = []

        def rotate(record: WorkerRecord | None) -> WorkerRecord | None:
            record = _active(worker_id, record)
            seen.append(record)
            if record.pending_generation is not None:
                return None
            if not self._due(record, now):
                raise Conflict(f"worker {worker_id} is not due for a rotation")
            return msgspec.structs.replace(
                record, pending_generation=record.generation + 1, pending_family=new_family_id()
            )

        changed = await self._update_worker(worker_id, rotate)
        pending = changed.after if changed is not None else seen[-1]
        assert pending.pending_generation is not None and pending.pending_family is not None
        credentials = await self._worker_credentials(worker_id, pending.pending_generation, pending.pending_family, now)
        logger.info(
            "rotated worker %s: %s generation %d (current from its first use)",
            worker_id, "issued" if changed is not None else "sent again", pending.pending_generation,
        )
        return Rotation(credentials=credentials, issued=changed is not None)

    async def promote(self, worker_id: str, generation: int) -> None:
        """Make the pending `generation` current: the worker has signed with it, so it has it."""
        now = self._clock()

        def promote(record: WorkerRecord | None) -> WorkerRecord | None:
            record = _active(worker_id, record)
            if record.pending_generation != generation or record.pending_family is None:
                return None  # another gateway promoted it first
            return msgspec.structs.replace(
                record,
                generation=generation,
                family=record.pending_family,
                pending_generation=None,
                pending_family=None,
                previous_generation=record.generation,
                previous_family=record.family,
                previous_valid_until_ms=now + self.rotation_grace_ms,
                generation_at_ms=now,
                rotation_requested_at_ms=None,
            )

        changed = await self._update_worker(worker_id, promote)
        if changed is None or changed.before is None:
            return
        old = changed.before
        await self._revoke_family(
            old.family, now, "worker credentials rotated", tokens_until_ms=changed.after.previous_valid_until_ms
        )
        logger.info(
            "worker %s switched to generation %d; generation %d verifies for %d ms more",
            worker_id, generation, old.generation, self.rotation_grace_ms,
        )

    async def request_rotation(self, worker_id: str) -> None:
        """Mark the worker's credentials for rotation; the gateway tells the worker at its next
        heartbeat, and the worker asks for them (so only the worker ever receives its secret)."""
        now = self._clock()

        def request(record: WorkerRecord | None) -> WorkerRecord:
            # The operator's request names a worker that is not there: 404 and 409, not the 401 of a
            # refused credential (the operator's own token is fine).
            if record is None:
                raise WorkerNotFound(f"worker {worker_id} is not enrolled", {"reason": AuthReason.UNKNOWN.value})
            if record.revoked_at_ms is not None:
                raise Conflict(f"worker {worker_id} is revoked", {"reason": AuthReason.REVOKED.value})
            return msgspec.structs.replace(record, rotation_requested_at_ms=now)

        changed = await self._update_worker(worker_id, request)
        assert changed is not None
        logger.info("rotation of worker %s requested (generation %d)", worker_id, changed.after.generation)

    async def rotation_due(self, worker_id: str) -> bool:
        """Whether the worker should rotate now: an operator asked, its generation is older than
        `worker_credentials_max_age_s`, or a pending generation waits for it (its last reply was lost)."""
        record = await self._worker_record(worker_id)
        return self._due(record.value, self._clock())

    def _due(self, record: WorkerRecord, now: int) -> bool:
        issued_at_ms = record.generation_at_ms or record.enrolled_at_ms
        return (
            record.pending_generation is not None
            or record.rotation_requested_at_ms is not None
            or now - issued_at_ms >= self.worker_max_age_ms
        )

    async def revoke_worker(self, worker_id: str) -> None:
        """Refuse the worker's signatures and tokens from now on; enrolling it again needs a token for it.
        Idempotent: revoking a revoked worker revokes its families again (the repair for a failed write)."""
        missing = WorkerNotFound(f"worker {worker_id} is not enrolled", {"reason": AuthReason.UNKNOWN.value})
        record = await self._revoke_record(worker_key(worker_id), records.worker_decoder.decode, missing)
        # Refused from now on by this gateway: the revoked record replaces the mirrored one before we answer.
        if (loaded := await self._bucket.load(worker_key(worker_id), records.worker_decoder.decode)) is not None:
            self._worker_records.put(worker_id, loaded)
        await self._revoke_worker_families(record, self._clock(), "worker revoked")
        logger.info("revoked worker %s", worker_id)

    async def worker_secret(self, worker_id: str) -> bytes:
        """The worker's current HMAC secret; `Unauthorized` when it is unknown or revoked."""
        record = (await self._worker_record(worker_id)).value
        return worker_secret(self._master_key, worker_id, record.generation)

    # --- Internals -------------------------------------------------------------------------------

    async def _worker_record(self, worker_id: str) -> Versioned[WorkerRecord]:
        """The worker's record from the mirror (`gateway.auth.worker_records`), else from the bucket;
        `Unauthorized` when it is unknown or revoked."""
        loaded = self._worker_records.get(worker_id)
        if loaded is None:
            loaded = await self._bucket.load(worker_key(worker_id), records.worker_decoder.decode)
            if loaded is not None:
                self._worker_records.put(worker_id, loaded)
        _active(worker_id, loaded.value if loaded is not None else None)
        assert loaded is not None
        return loaded

    async def _update_worker(
        self, worker_id: str, change: Callable[[WorkerRecord | None], WorkerRecord | None]
    ) -> Changed[WorkerRecord] | None:
        """Compare-and-set the worker's record, and mirror what was written before answering."""
        changed = await self._bucket.update(worker_key(worker_id), records.worker_decoder.decode, change, what=f"worker {worker_id}")
        if changed is not None:
            self._worker_records.put(worker_id, Versioned(changed.after, changed.revision))
        return changed

    def _generations(self, record: WorkerRecord, now: int) -> list[int]:
        """The generations a request from this worker may be signed with right now."""
        generations = [record.generation]
        if record.pending_generation is not None:
            generations.append(record.pending_generation)
        if record.previous_generation is not None and now <= record.previous_valid_until_ms:
            generations.append(record.previous_generation)
        return generations

    async def _worker_credentials(self, worker_id: str, generation: int, family_id: str, now: int) -> WorkerCredentials:
        family = await self._family(family_id, worker_id, "worker", "worker", now)
        pair = self._pair(family, now)
        return WorkerCredentials(
            worker_id=worker_id,
            access_token=pair.access_token,
            refresh_token=pair.refresh_token,
            hmac_secret_hex=worker_secret(self._master_key, worker_id, generation).hex(),
            generation=generation,
            expires_in_s=pair.expires_in_s,
            refresh_expires_in_s=pair.refresh_expires_in_s,
        )

    async def _revoke_worker_families(self, record: WorkerRecord, now: int, reason: str) -> None:
        """Every family the worker holds (current, pending, previous in its grace): nothing is left."""
        for family in (record.family, record.pending_family, record.previous_family):
            if family is not None:
                await self._revoke_family(family, now, reason)

    async def _usable_enrollment(self, token: str, now: int | None = None) -> tuple[str, Versioned[EnrollmentRecord]]:
        """An enrollment token's id and record, when it is known, unused and unexpired at `now`;
        `Unauthorized` with the reason otherwise."""
        token_id, loaded = await self._load_secret(
            token, ENROLLMENT_PREFIX, "enrollment token", enroll_key, records.enrollment_decoder.decode
        )
        if loaded.value.used_at_ms is not None:
            raise refused(AuthReason.ALREADY_USED, "enrollment token already used")
        if (self._clock() if now is None else now) >= loaded.value.expires_at_ms:
            raise refused(AuthReason.EXPIRED, "enrollment token expired")
        return token_id, loaded

    def _enrollment_ttl_s(self, record: EnrollmentRecord) -> float:
        """An enrollment token's record is forgotten after its expiry (then it is refused as unknown)."""
        return (record.expires_at_ms - self._clock() + self.skew_ms) / 1000


def _active(worker_id: str, record: WorkerRecord | None) -> WorkerRecord:
    if record is None:
        raise refused(AuthReason.UNKNOWN, f"worker {worker_id} is not enrolled")
    if record.revoked_at_ms is not None:
        raise refused(AuthReason.REVOKED, f"worker {worker_id} is revoked")
    return record
