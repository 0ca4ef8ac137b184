"""The placement index: `placement.choose_worker`'s answers without reading every worker per job.

Built once per scheduling pass from the view's candidates. Only workers that can take work (alive, not
draining, a free slot) enter it, in one heap per (capability, region) and one per (capability, region,
loaded model), ordered by the rest of the rank (more free memory, fewer jobs in flight, worker id). A
decision walks the job's regions nearest first (`sdk.regions`; one tier per distance, so regions at the
same distance compete on rank), and in each region looks at the model's heap before the plain one: the
first entry that passes the remaining rules (allow-list, acceptance draw) is that region's best. Entries
are lazy: taking a slot only counts it, so a worker's entries may hold an older, smaller count (a lower
bound of its rank); an entry that surfaces with an old count is put back with the current one, and
one of a full worker is dropped. So a decision costs a few heap operations per region looked at, not
one check per worker.

`plan` is a whole pass: jobs in the order the view offers them, each placed or skipped. Once a kind of
job (type, model, region, policy, latency bound) found no worker, the rest of that kind wait for the
next pass without being tried, and the pass ends when no slot is left anywhere: a pass over 100,000
queued jobs costs about one decision per placed job plus a dictionary look-up per skipped one.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from itertools import groupby

from scheduler.placement import Candidate, Placement, describe_rank, distance_of
from sdk.jobs import Job
from sdk.regions import LatencyTable, effective_policy

#: A heap entry: (negated free memory, unknown last; jobs in flight; worker id), smallest first.
Entry = tuple[int, int, str]
#: The key of a region's heaps that holds every region (for `any` and `strict` jobs).
EVERYWHERE = ""


class PlacementIndex:
    def __init__(self, candidates: Iterable[Candidate], latencies: LatencyTable) -> None:
        self.latencies = latencies
        self.workers: dict[str, Candidate] = {}
        self._in_flight: dict[str, int] = {}
        self._heaps: dict[tuple[str, str, str | None], list[Entry]] = {}
        #: capability -> the regions that have a worker with it.
        self._regions: dict[str, set[str]] = {}
        #: (capability, job region) -> regions grouped by distance, nearest first.
        self._tiers: dict[tuple[str, str], list[tuple[float, list[str]]]] = {}
        #: Free slots over the whole index: a pass ends when none is left.
        self.free_slots = 0
        for worker in candidates:
            if not worker.alive or worker.draining or worker.in_flight >= worker.max_concurrency:
                continue
            self.workers[worker.worker_id] = worker
            self._in_flight[worker.worker_id] = worker.in_flight
            self.free_slots += worker.max_concurrency - worker.in_flight
            for capability in worker.capabilities:
                self._regions.setdefault(capability, set()).add(worker.region)
            self._push(worker)

    def _push(self, worker: Candidate) -> None:
        memory = worker.memory_free_bytes
        entry = (1 if memory is None else -memory, self._in_flight[worker.worker_id], worker.worker_id)
        for capability in worker.capabilities:
            for region in (worker.region, EVERYWHERE):
                for model in (None, *worker.loaded_models):
                    heapq.heappush(self._heaps.setdefault((capability, region, model), []), entry)

    def choose(self, job: Job, *, draw: float) -> Placement | None:
        """The worker `choose_worker` would pick among the indexed ones, or None."""
        policy = effective_policy(job.region, job.region_policy)
        if policy == "nearest":
            assert job.region is not None
            for distance_ms, regions in self._tiers_from(job.type, job.region):
                if job.max_latency_ms is not None and distance_ms > job.max_latency_ms:
                    return None
                best = min(filter(None, (self._best(job, region, draw) for region in regions)), default=None)
                if best is not None:
                    return self._placement(job, best[-1])
            return None
        region = job.region if policy == "strict" else EVERYWHERE
        assert region is not None
        best = self._best(job, region, draw)
        return None if best is None else self._placement(job, best[-1])

    def take(self, worker_id: str) -> None:
        """One more job in flight on `worker_id` (it was just chosen); its entries catch up lazily."""
        self._in_flight[worker_id] += 1
        self.free_slots -= 1

    def in_flight(self, worker_id: str) -> int:
        """The worker's jobs in flight as this pass counts them."""
        return self._in_flight[worker_id]

    def _placement(self, job: Job, worker_id: str) -> Placement:
        region = self.workers[worker_id].region
        return Placement(worker_id=worker_id, region=region, distance_ms=distance_of(job, region, self.latencies))

    def _tiers_from(self, capability: str, region: str) -> list[tuple[float, list[str]]]:
        tiers = self._tiers.get((capability, region))
        if tiers is None:
            distance = self.latencies.distance_ms
            regions = sorted(self._regions.get(capability, ()), key=lambda r: (distance(region, r), r))
            tiers = [(d, list(group)) for d, group in groupby(regions, key=lambda r: distance(region, r))]
            self._tiers[(capability, region)] = tiers
        return tiers

    def _best(self, job: Job, region: str, draw: float) -> tuple[bool, int, int, str] | None:
        """The rank (as `placement.rank` orders it) of the region's best able worker, or None."""
        if job.model is not None:
            found = self._first_able(self._heaps.get((job.type, region, job.model)), job, draw)
            if found is not None:
                return (False, *found)
        found = self._first_able(self._heaps.get((job.type, region, None)), job, draw)
        return None if found is None else (True, *found)

    def _first_able(self, heap: list[Entry] | None, job: Job, draw: float) -> Entry | None:
        """The smallest current entry whose worker passes the remaining rules; entries it looked past
        stay in the heap."""
        if not heap:
            return None
        passed: list[Entry] = []
        found = None
        while heap:
            memory, counted, worker_id = heap[0]
            worker = self.workers[worker_id]
            in_flight = self._in_flight[worker_id]
            if in_flight >= worker.max_concurrency:
                heapq.heappop(heap)  # full for the rest of this pass
            elif counted != in_flight:
                heapq.heapreplace(heap, (memory, in_flight, worker_id))  # took jobs since: its real place
            elif _declines(worker, job, draw):
                passed.append(heapq.heappop(heap))
            else:
                found = heap[0]
                break
        for entry in passed:
            heapq.heappush(heap, entry)
        return found


def _declines(worker: Candidate, job: Job, draw: float) -> bool:
    not_allowed = job.model is not None and bool(worker.allowed_models) and job.model not in worker.allowed_models
    return not_allowed or draw >= worker.acceptance_rate


def _kind(job: Job) -> tuple[object, ...]:
    """Jobs of one kind meet the same workers: when one finds none, so do the others (in this pass)."""
    return (job.type, job.model, job.region, job.region_policy, job.max_latency_ms)


Decision = tuple[Job, Placement, str]


def plan(queued: Iterable[Job], index: PlacementIndex, draw: Callable[[], float]) -> list[Decision]:
    """Place `queued` in order on `index` (which counts the slots taken); one draw per offer. Each
    decision comes with why its worker won (`placement.describe_rank`)."""
    decisions: list[Decision] = []
    stuck: set[tuple[object, ...]] = set()
    for job in queued:
        if index.free_slots <= 0:
            break
        kind = _kind(job)
        if kind in stuck:
            continue
        placement = index.choose(job, draw=draw())
        if placement is None:
            stuck.add(kind)
            continue
        worker_id = placement.worker_id
        why = describe_rank(job, index.workers[worker_id], placement.distance_ms, index.in_flight(worker_id))
        index.take(placement.worker_id)
        decisions.append((job, placement, why))
    return decisions
