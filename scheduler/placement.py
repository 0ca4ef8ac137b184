"""Placement: which worker, if any, takes a queued job. A pure function of the job, the workers, the
operator's latency table and a draw.

Rules, in the order a worker is checked (the first one it fails is its reason):
1. alive (registered, heartbeating, not lost or deregistered) and not draining;
2. where the job may run (`sdk.regions.effective_policy`): with `strict`, only the job's region; with
   `nearest` and `max_latency_ms`, no farther than that from the job's region (an unknown pair is far);
3. has an engine for the job type (`capabilities`);
4. allows the job's model, when it has an allow-list (an empty list allows any model);
5. has a free slot (`in_flight < max_concurrency`);
6. accepts the offer: a worker with acceptance rate r accepts when `draw < r`, so rate 0 never accepts
   and rate 1 always does. The caller draws a uniform number in [0, 1) once per offer, which keeps this
   function pure and tests exact.

Ranking among the workers that can take it: with `nearest`, the nearest region first (the job's own
region is 0 ms away, so a worker there wins whenever one can take the job now); then model already
loaded (no load time), then more free memory (unknown memory ranks below any known amount), then fewer
jobs in flight, then `worker_id` so the choice is deterministic. `any` and `strict` skip the distance.

This is the reference: `scheduler.index.PlacementIndex` answers the same question without reading every
worker, and a property test holds the two to the same answers. `explain` groups the refusals for
people (`GET /api/v1/jobs/{id}/placement`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

from sdk.jobs import Job
from sdk.placement import PlacementReason
from sdk.regions import FAR_MS, LatencyTable, describe_ms, effective_policy

#: How many worker ids an explanation names per reason.
SAMPLE_SIZE = 5
NO_LATENCIES = LatencyTable()


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """What placement needs to know about one worker at one instant."""

    worker_id: str
    region: str
    capabilities: tuple[str, ...] = ("echo",)
    max_concurrency: int = 4
    #: Jobs the platform has assigned to this worker that have not finished.
    in_flight: int = 0
    acceptance_rate: float = 1.0
    #: Models this worker may run; empty means any model.
    allowed_models: tuple[str, ...] = ()
    loaded_models: tuple[str, ...] = ()
    #: Free GPU memory as last reported; None when the worker did not say.
    memory_free_bytes: int | None = None
    alive: bool = True
    draining: bool = False


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    region: str
    #: From the job's region to the worker's (None when the job named no region).
    distance_ms: float | None = None


class NoPlacement(msgspec.Struct, frozen=True, kw_only=True):
    #: Why each worker could not take the job, by worker id (e.g. `{"w1": "busy 4/4"}`).
    reasons: dict[str, str]


class Refusal(msgspec.Struct, frozen=True):
    #: One of `not_alive`, `draining`, `region`, `too_far`, `capability`, `model`, `busy`, `declined`.
    kind: str
    text: str


def refusal(job: Job, worker: Candidate, *, draw: float, latencies: LatencyTable = NO_LATENCIES) -> Refusal | None:
    """Why `worker` cannot take `job` now, or None when it can."""
    if not worker.alive:
        return Refusal("not_alive", "not alive")
    if worker.draining:
        return Refusal("draining", "draining")
    policy = effective_policy(job.region, job.region_policy)
    if policy == "strict" and worker.region != job.region:
        return Refusal("region", f"region {worker.region} is not {job.region} (strict)")
    if policy == "nearest" and job.max_latency_ms is not None and job.region is not None:
        if latencies.distance_ms(job.region, worker.region) > job.max_latency_ms:
            return Refusal("too_far", f"region {worker.region} farther than max_latency_ms {job.max_latency_ms:g}")
    if job.type not in worker.capabilities:
        return Refusal("capability", f"no capability {job.type}")
    if job.model is not None and worker.allowed_models and job.model not in worker.allowed_models:
        return Refusal("model", f"model {job.model} not allowed")
    if worker.in_flight >= worker.max_concurrency:
        return Refusal("busy", f"busy {worker.in_flight}/{worker.max_concurrency}")
    if draw >= worker.acceptance_rate:
        return Refusal("declined", f"declined (acceptance rate {worker.acceptance_rate:.2f})")
    return None


def rank(job: Job, worker: Candidate) -> tuple[bool, int, int, str]:
    """The order among able workers of one distance: smaller wins."""
    model_loaded = job.model is not None and job.model in worker.loaded_models
    memory_free_bytes = -1 if worker.memory_free_bytes is None else worker.memory_free_bytes
    return (not model_loaded, -memory_free_bytes, worker.in_flight, worker.worker_id)


def distance_of(job: Job, region: str, latencies: LatencyTable) -> float | None:
    """How far `region` is from the job's region, for the record; None when the job named none or
    nobody gave the pair's distance."""
    if job.region is None:
        return None
    distance_ms = latencies.distance_ms(job.region, region)
    return None if math.isinf(distance_ms) else distance_ms


def choose_worker(
    job: Job, workers: Iterable[Candidate], *, draw: float, latencies: LatencyTable = NO_LATENCIES
) -> Placement | NoPlacement:
    """The best worker for `job`, or the reason each worker refused it."""
    able: list[Candidate] = []
    reasons: dict[str, str] = {}
    for worker in workers:
        refused = refusal(job, worker, draw=draw, latencies=latencies)
        if refused is None:
            able.append(worker)
        else:
            reasons[worker.worker_id] = refused.text
    if not able:
        return NoPlacement(reasons=reasons)
    if effective_policy(job.region, job.region_policy) == "nearest":
        assert job.region is not None
        region = job.region
        best = min(able, key=lambda w: (latencies.distance_ms(region, w.region), rank(job, w)))
    else:
        best = min(able, key=lambda w: rank(job, w))
    return Placement(worker_id=best.worker_id, region=best.region, distance_ms=distance_of(job, best.region, latencies))


def describe_rank(job: Job, worker: Candidate, distance_ms: float | None, in_flight: int | None = None) -> str:
    """Why a worker won, in words, for the `JobAssigned` event and the explanation (`in_flight`: its
    count at the decision, when it moved since `worker` was taken)."""
    parts = [f"region {worker.region}"]
    if job.region is not None:
        parts[0] += f" ({describe_ms(FAR_MS if distance_ms is None else distance_ms)} from {job.region})"
    if job.model is not None:
        parts.append(f"model {job.model} {'loaded' if job.model in worker.loaded_models else 'not loaded'}")
    if worker.memory_free_bytes is not None:
        parts.append(f"{worker.memory_free_bytes / 1024**3:.1f} GiB free")
    parts.append(f"{worker.in_flight if in_flight is None else in_flight}/{worker.max_concurrency} in flight")
    return "; ".join(parts)


# --- Explanations ----------------------------------------------------------------------------------


def explain(
    job: Job, workers: Iterable[Candidate], latencies: LatencyTable = NO_LATENCIES
) -> tuple[int, list[PlacementReason]]:
    """How many workers could take `job` now (a draw of 0: any acceptance rate above 0 may accept),
    and, per reason, the workers that cannot; the largest group first."""
    able = 0
    groups: dict[str, tuple[Refusal, str, list[str]]] = {}
    for worker in workers:
        refused = refusal(job, worker, draw=0.0, latencies=latencies)
        if refused is None:
            able += 1
        else:
            groups.setdefault(refused.text, (refused, worker.region, []))[2].append(worker.worker_id)
    out = [
        PlacementReason(
            reason=text, workers=len(ids), sample=sorted(ids)[:SAMPLE_SIZE],
            change=_change(job, refused, distance_of(job, region, latencies)),
        )
        for text, (refused, region, ids) in groups.items()
    ]
    out.sort(key=lambda group: (-group.workers, group.reason))
    return able, out


def _change(job: Job, refused: Refusal, distance_ms: float | None) -> str:
    """What would let the workers refused for this reason take the job (`distance_ms`: how far their
    region is, which matters only to `too_far`, where every worker of a reason shares one region)."""
    match refused.kind:
        case "not_alive":
            return "the worker heartbeats again (or registers again)"
        case "draining":
            return "nothing: a draining worker takes no new jobs"
        case "region":
            return f"a worker of region {job.region} that can take it, or region_policy nearest or any"
        case "too_far" if distance_ms is None:
            return "a latency for this pair in the region table, within max_latency_ms, or a worker within it"
        case "too_far":
            return f"max_latency_ms of at least {distance_ms:g} (their distance), or a worker within it"
        case "capability":
            return f"a worker with the {job.type} engine registers"
        case "model":
            return f"an operator allows model {job.model} in these workers' runtime config"
        case "busy":
            return "one of their jobs finishes"
        case _:
            return "an operator raises load_control.acceptance_rate"
