"""Revoked token families and subjects, mirrored in memory from the `auth` bucket by a KV watch.

Access tokens are self-contained, so verifying one must not read the bucket; this cache answers the
only question left (was it revoked since it was issued?) from memory. The gateway that revokes adds the
marker here at once; every other gateway sees it through its watch within milliseconds.

The cache stays small: a marker matters only while tokens it could stop are alive, so after its instant
plus the access-token TTL (and the skew margin) it is dropped (`prune`); the bucket forgets it then too
(the marker's TTL), so a starting gateway loads only the markers that still matter.

Clocks differ between gateways: a subject marker also stops tokens stamped up to `skew_ms` after its
instant, by a gateway whose clock runs ahead (a revoked key gets no new tokens, so nothing legitimate
is lost).
"""

from __future__ import annotations

import logging

import msgspec
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from gateway.auth.records import (
    REVOKED,
    Revocation,
    family_revocation_key,
    revocation_decoder,
    subject_revocation_key,
)
from gateway.auth.tokens import AccessClaims
from gateway.kv import KeyMirror

logger = logging.getLogger(__name__)


class RevocationCache(KeyMirror):
    def __init__(self, kv: KeyValue, *, retain_ms: int, skew_ms: int) -> None:
        super().__init__(kv, REVOKED)
        self._retain_ms = retain_ms
        self._skew_ms = skew_ms
        self._markers: dict[str, Revocation] = {}

    async def start(self, timeout_s: float = 10.0) -> None:
        """Load every marker, then follow changes in the background."""
        await super().start(timeout_s)
        logger.info("revocation cache loaded %d markers", len(self._markers))

    def apply(self, entry: KeyValue.Entry) -> None:
        if entry.operation in (KV_DEL, KV_PURGE):
            self._markers.pop(entry.key, None)
            return
        try:
            self._markers[entry.key] = revocation_decoder.decode(entry.value or b"")
        except msgspec.DecodeError:
            logger.warning("ignored an undecodable revocation marker %s", entry.key)

    def add(self, key: str, revocation: Revocation) -> None:
        """Take a marker this process just wrote into account now, not when the watch delivers it."""
        self._markers[key] = revocation

    def marker(self, key: str) -> Revocation | None:
        return self._markers.get(key)

    def revoked(self, claims: AccessClaims, now_ms: int) -> bool:
        family = self._markers.get(family_revocation_key(claims.fam))
        if family is not None and now_ms >= family.at_ms:
            return True
        subject = self._markers.get(subject_revocation_key(claims.kind, claims.sub))
        return subject is not None and claims.iat_ms <= subject.at_ms + self._skew_ms

    def prune(self, now_ms: int) -> None:
        """Forget markers older than any token they could still stop."""
        stale = [key for key, marker in self._markers.items() if marker.at_ms + self._retain_ms < now_ms]
        for key in stale:
            del self._markers[key]

    def __len__(self) -> int:
        return len(self._markers)
