"""Replay protection for signed worker requests: a timestamp window plus the nonces seen inside it.

A signed request is accepted only if its timestamp is within `window_s` of the gateway's clock and its
nonce was not seen before. A nonce needs remembering only while its timestamp is inside the window:
after that the timestamp check refuses the replay by itself. So memory is bounded by (signed requests
per second) x (2 x window), and only requests with a valid signature get this far.

The window is per gateway process. With several gateways a replay could reach another replica inside
the window; the job's attempt check (DESIGN invariant 2) makes a replayed report a no-op there. The
requests that issue credentials (registration, rotation) keep their nonces in the `auth` bucket instead,
with create-only writes, so a replay is refused on every replica and after a restart
(`gateway.auth.signed`).
"""

from __future__ import annotations

import heapq

from sdk.signing import AuthReason, refused


class NonceWindow:
    def __init__(self, window_s: float = 60.0) -> None:
        self.window_ms = int(window_s * 1000)
        self._seen: set[tuple[str, str]] = set()
        #: (forget_at_ms, worker_id, nonce), earliest first.
        self._expiry: list[tuple[int, str, str]] = []

    def require_fresh(self, timestamp_ms: int, now_ms: int) -> None:
        """Raise `Unauthorized` (`stale_timestamp`) for a timestamp outside the window; the cheapest check,
        so it runs before any bucket read or hashing."""
        if abs(now_ms - timestamp_ms) > self.window_ms:
            raise refused(
                AuthReason.STALE_TIMESTAMP,
                f"request signed at {timestamp_ms} is outside the {self.window_ms} ms window around {now_ms}",
            )

    def check(self, worker_id: str, timestamp_ms: int, nonce: str, now_ms: int) -> None:
        """Accept (and remember) a fresh nonce, or raise `Unauthorized` with reason
        `stale_timestamp` or `replayed_nonce`."""
        self._forget(now_ms)
        self.require_fresh(timestamp_ms, now_ms)
        key = (worker_id, nonce)
        if key in self._seen:
            raise refused(AuthReason.REPLAYED_NONCE, f"nonce already used by {worker_id}")
        self._seen.add(key)
        # From then on the timestamp is stale, which refuses a replay without the nonce.
        heapq.heappush(self._expiry, (timestamp_ms + self.window_ms, worker_id, nonce))

    def _forget(self, now_ms: int) -> None:
        while self._expiry and self._expiry[0][0] < now_ms:
            _, worker_id, nonce = heapq.heappop(self._expiry)
            self._seen.discard((worker_id, nonce))

    def __len__(self) -> int:
        return len(self._seen)
