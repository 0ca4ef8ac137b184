"""Placement: which worker, if any, takes a queued job. A pure function of the job, the workers and a draw.

Rules, in the order a worker is checked (the first one it fails is its reason):
1. alive (registered, heartbeating, not lost or deregistered) and not draining;
2. has an engine for the job type (`capabilities`);
3. allows the job's model, when it has an allow-list (an empty list allows any model);
4. has a free slot (`in_flight < max_concurrency`);
5. accepts the offer: a worker with acceptance rate r accepts when `draw < r`, so rate 0 never accepts
   and rate 1 always does. The caller draws a uniform number in [0, 1) once per offer, which keeps this
   function pure and tests exact.

Region: a job that names a region goes to a worker of that region when one of them can take it (all five
rules, acceptance included); otherwise it goes to the best worker of any region. We chose fallback over
waiting because a user who names a region wants low latency, and a job that waits for a busy region
forever is worse than one that runs a little further away.

Ranking among the workers that can take it: model already loaded first (no load time), then more free
memory (unknown memory ranks below any known amount), then fewer jobs in flight, then `worker_id` so the
choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from sdk.jobs import Job


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


class NoPlacement(msgspec.Struct, frozen=True, kw_only=True):
    #: Why each worker could not take the job, by worker id (e.g. `{"w1": "busy 4/4"}`).
    reasons: dict[str, str]


def _refusal(job: Job, worker: Candidate, *, draw: float) -> str | None:
    """Why `worker` cannot take `job` now, or None when it can."""
    if not worker.alive:
        return "not alive"
    if worker.draining:
        return "draining"
    if job.type not in worker.capabilities:
        return f"no capability {job.type}"
    if job.model is not None and worker.allowed_models and job.model not in worker.allowed_models:
        return f"model {job.model} not allowed"
    if worker.in_flight >= worker.max_concurrency:
        return f"busy {worker.in_flight}/{worker.max_concurrency}"
    if draw >= worker.acceptance_rate:
        return f"declined (acceptance rate {worker.acceptance_rate:.2f})"
    return None


def _rank(job: Job, worker: Candidate) -> tuple[bool, int, int, str]:
    model_loaded = job.model is not None and job.model in worker.loaded_models
    memory_free_bytes = -1 if worker.memory_free_bytes is None else worker.memory_free_bytes
    return (not model_loaded, -memory_free_bytes, worker.in_flight, worker.worker_id)


def choose_worker(job: Job, workers: Iterable[Candidate], *, draw: float) -> Placement | NoPlacement:
    """The best worker for `job`, or the reason each worker refused it."""
    able: list[Candidate] = []
    reasons: dict[str, str] = {}
    for worker in workers:
        reason = _refusal(job, worker, draw=draw)
        if reason is None:
            able.append(worker)
        else:
            reasons[worker.worker_id] = reason
    if not able:
        return NoPlacement(reasons=reasons)
    in_region = [w for w in able if w.region == job.region]
    best = min(in_region or able, key=lambda w: _rank(job, w))
    return Placement(worker_id=best.worker_id, region=best.region)
