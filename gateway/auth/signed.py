"""Verification of signed worker requests (`sdk.signing`): reports, heartbeats, rotation, registration.

The checks run cheapest first, so a forger makes the gateway do as little as possible: the headers
parse (strictly), the timestamp is inside the replay window, the header's worker is the subject's, the
body is at most `MAX_SIGNED_BODY_BYTES`; only then one bucket read (the worker's record) and one hash
of the body, whatever the number of secrets that may verify (current, pending, previous in its grace).
Last the nonce: in this process's `NonceWindow` for reports and heartbeats, in the `auth` bucket
(create-only, with the window's TTL) for the requests that issue credentials, so a replay of those is
refused by every gateway replica and after a restart. Those requests also sign their reply subject
(`sdk.signing.issues_credentials`): their answer goes only where the worker asked for it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from gateway.auth.master_key import worker_secret
from gateway.auth.records import NonceRecord, nonce_key
from gateway.auth.replay import NonceWindow
from gateway.auth.workers import WorkerEnrollment
from sdk import subjects
from sdk.api import Token, convert
from sdk.errors import BadRequest, PlatformError
from sdk.signing import (
    MAX_SIGNED_BODY_BYTES,
    WORKER_ID_HEADER,
    AuthReason,
    SignedHeaders,
    forbidden,
    issues_credentials,
    read_headers,
    refused,
    signed_by,
)

logger = logging.getLogger(__name__)

class SignedRequests(WorkerEnrollment):
    nonces: NonceWindow

    async def verify_report(
        self, subject: str, body: bytes, headers: Mapping[str, str] | None, now_ms: int | None = None,
        *, reply: str = "", max_body_bytes: int = MAX_SIGNED_BODY_BYTES,
    ) -> str:
        """`verify_signed` for a subject that ends in the worker id (report, heartbeat, rotate, result)."""
        return await self.verify_signed(
            subject, body, headers, now_ms, reply=reply, max_body_bytes=max_body_bytes, worker_in_subject=True
        )

    async def verify_signed(
        self,
        subject: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        now_ms: int | None = None,
        *,
        reply: str = "",
        max_body_bytes: int = MAX_SIGNED_BODY_BYTES,
        worker_in_subject: bool = False,
    ) -> str:
        """Check a signed worker request, answered on `reply`, and return the worker id: the one the
        subject ends in (`worker_in_subject`), or else the one the `X-Worker-Id` header names (a returning
        worker's registration, its config read). Refusals: `Forbidden` when the header's worker is not the
        subject's, `BadRequest` for a body over `max_body_bytes` (an endpoint that takes larger bodies
        passes its own cap), `Unauthorized` with the reason otherwise."""
        now = self._clock() if now_ms is None else now_ms
        try:
            signed = read_headers(headers)
            self.nonces.require_fresh(signed.timestamp_ms, now)
            worker_id = _subject_worker(subject) if worker_in_subject else convert(signed.worker_id, Token)
            if signed.worker_id != worker_id:
                raise forbidden(
                    AuthReason.WORKER_MISMATCH,
                    f"{WORKER_ID_HEADER} {signed.worker_id!r} does not match the subject's worker {worker_id!r}",
                )
            if len(body) > max_body_bytes:
                raise BadRequest(f"a signed request's body is at most {max_body_bytes} bytes, not {len(body)}")
            record = (await self._worker_record(worker_id)).value
            generations = self._generations(record, now)
            secrets_ = [worker_secret(self._master_key, worker_id, generation) for generation in generations]
            matched = signed_by(secrets_, subject, body, signed, reply=reply)
            if matched is None:
                raise refused(AuthReason.BAD_SIGNATURE, f"bad signature from worker {worker_id}")
            await self._spend_nonce(subject, worker_id, signed, now)
        except PlatformError as exc:
            logger.warning("refused signed request on %s: %s", subject, exc.message)
            raise
        if generations[matched] == record.pending_generation:
            await self.promote(worker_id, record.pending_generation)
        return worker_id

    async def _spend_nonce(self, subject: str, worker_id: str, signed: SignedHeaders, now: int) -> None:
        if not issues_credentials(subject):
            self.nonces.check(worker_id, signed.timestamp_ms, signed.nonce, now)
            return
        # Seen by any replica within the window: after it, the timestamp check refuses the replay itself.
        record = NonceRecord(subject=subject, timestamp_ms=signed.timestamp_ms)
        ttl_s = 2 * self.nonces.window_ms / 1000
        if await self._bucket.create(nonce_key(worker_id, signed.nonce), record, ttl_s=ttl_s) is None:
            raise refused(AuthReason.REPLAYED_NONCE, f"nonce already used by {worker_id}")


def _subject_worker(subject: str) -> str:
    for names in subjects.SIGNED_BY_SUBJECT:
        if (worker_id := names.token(subject)) is not None:
            return worker_id
    raise BadRequest(f"{subject} is not a worker report, heartbeat or rotate subject")
