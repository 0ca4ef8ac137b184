"""Regions and the distance between them: the operator's latency table and a job's region policy.

An operator describes how far apart regions are (`PUT /api/v1/config/regions`):

    {"latency_ms": {"eu-west": {"us-east": 80, "ap-south": 130}, "us-east": {"ap-south": 210}}}

A pair given once counts both ways; a region is 0 ms from itself; a pair nobody gave is far
(`FAR_MS`, infinite), so it ranks after every known one. The same table is read by the gateway
(validation) and the scheduler (placement), so both agree on what a distance is.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

from sdk.api import RegionPolicy, Strict, Token
from sdk.errors import BadRequest

__all__ = ["FAR_MS", "LatencyTable", "RegionLatencies", "RegionPolicy", "effective_policy", "validate_latencies"]
#: The distance of a pair nobody described: after every known distance.
FAR_MS = math.inf
#: Latencies beyond a minute are a typo, not a network.
MAX_LATENCY_MS = 60_000.0

LatencyMs = Annotated[float, msgspec.Meta(ge=0, le=MAX_LATENCY_MS)]


class RegionLatencies(Strict):
    """The operator's latency table as sent and stored: `latency_ms[a][b]` in milliseconds."""

    latency_ms: dict[Token, dict[Token, LatencyMs]] = {}


class LatencyTable:
    """Symmetric distances between regions, built once from a validated `RegionLatencies`."""

    def __init__(self, latencies: RegionLatencies | None = None) -> None:
        self._pairs: dict[tuple[str, str], float] = {}
        for a, row in (latencies or RegionLatencies()).latency_ms.items():
            for b, ms in row.items():
                self._pairs[(a, b)] = self._pairs[(b, a)] = ms
        self.regions: frozenset[str] = frozenset(r for pair in self._pairs for r in pair)

    def distance_ms(self, a: str, b: str) -> float:
        """0 from a region to itself, the operator's figure for a known pair, `FAR_MS` otherwise."""
        if a == b:
            return 0.0
        return self._pairs.get((a, b), FAR_MS)


def validate_latencies(latencies: RegionLatencies) -> LatencyTable:
    """The table, or `BadRequest` naming the first pair that makes no sense: a region given a distance
    from itself other than 0, or a pair given both ways with two different figures."""
    seen: dict[tuple[str, str], float] = {}
    for a, row in latencies.latency_ms.items():
        for b, ms in row.items():
            if a == b and ms != 0:
                raise BadRequest(f"latency_ms.{a}.{b}: a region is 0 ms from itself, not {ms:g}")
            other = seen.get((b, a))
            if other is not None and other != ms:
                raise BadRequest(f"latency_ms: {a}<->{b} is given as both {other:g} and {ms:g} ms")
            seen[(a, b)] = ms
    return LatencyTable(latencies)


def describe_ms(ms: float) -> str:
    return "unknown (far)" if math.isinf(ms) else f"{ms:g} ms"


def effective_policy(region: str | None, policy: RegionPolicy | None) -> RegionPolicy:
    """What a job's policy means: `nearest` (to `region`) runs it in that region if a worker there can
    take it now, else in the nearest region that has one; `strict` only in that region (the job waits,
    and expires by `timeout_s`, rather than leave it); `any` anywhere, distance ignored. Without a
    region there is nothing to be near: `any`."""
    if region is None:
        return "any"
    return policy or "nearest"
