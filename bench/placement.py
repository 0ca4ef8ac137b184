"""Placement at fleet scale: one decision at 100 / 1,000 / 10,000 workers, and a whole scheduler pass.

    python -m bench.placement --decisions 2000 --queued 100000 --pass-workers 10000

A decision is measured two ways on the same fleet: the reference `placement.choose_worker`, which
reads every worker, and the `PlacementIndex` the scheduler uses (built once per pass, then one `choose`
and `take` per job). The pass is what the leader does per wake-up, from its in-memory view: order the
queue fairly, build the candidates and the index, and decide every job (the appends that follow are
network and are measured by `bench.echo_throughput`). No NATS, no I/O: pure CPU on one core.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Annotated

from cyclopts import Parameter
from rich.table import Table

from bench.cli import bench_app, figures
from scheduler.index import PlacementIndex, plan
from scheduler.placement import Candidate, choose_worker
from scheduler.view import SchedulerView
from sdk.events import JobSubmitted, WorkerRegistered
from sdk.jobs import Job, apply
from sdk.regions import RegionLatencies, validate_latencies

app, console = bench_app("bench-placement", __doc__)

REGIONS = ["eu-west", "eu-central", "us-east", "us-west", "ap-south", "ap-east", "sa-east", "af-south"]
LATENCIES = validate_latencies(
    RegionLatencies(
        latency_ms={a: {b: 20.0 + 15 * abs(i - j) for j, b in enumerate(REGIONS) if j > i} for i, a in enumerate(REGIONS)}
    )
)
MODELS = [f"model-{n}" for n in range(20)]
GiB = 1024**3


def fleet(size: int, rng: random.Random) -> list[Candidate]:
    """Workers spread over the regions, some busy, most with a model or two loaded."""
    return [
        Candidate(
            worker_id=f"w{n:06d}",
            region=rng.choice(REGIONS),
            capabilities=("echo", "llm") if rng.random() < 0.8 else ("echo",),
            max_concurrency=4,
            in_flight=rng.choice([0, 0, 1, 2, 3, 4]),
            loaded_models=tuple(rng.sample(MODELS, rng.choice([0, 1, 2]))),
            memory_free_bytes=rng.randrange(1, 80) * GiB,
        )
        for n in range(size)
    ]


def job(n: int, rng: random.Random, clients: int = 50) -> Job:
    llm = rng.random() < 0.7
    region = rng.choice([*REGIONS, None])
    event = JobSubmitted(
        job_id=f"j{n:07d}", job_type="llm" if llm else "echo", model=rng.choice(MODELS) if llm else None,
        region=region, region_policy=rng.choice([None, None, "strict", "any"]) if region else None,
        owner=f"client-{rng.randrange(clients)}",
    )
    return apply(None, event, seq=n + 1)


def decision_times(workers: int, decisions: int, rng: random.Random) -> tuple[float, float, float]:
    """Median µs per decision: the reference, the index; and the index's build in ms."""
    candidates = fleet(workers, rng)
    jobs = [job(n, rng) for n in range(decisions)]
    reference_us = []
    for j in jobs[: max(50, decisions // (workers // 100 or 1))]:
        started = time.process_time()
        choose_worker(j, candidates, draw=0.0, latencies=LATENCIES)
        reference_us.append((time.process_time() - started) * 1e6)
    started = time.process_time()
    index = PlacementIndex(candidates, LATENCIES)
    build_ms = (time.process_time() - started) * 1e3
    index_us = []
    for j in jobs:
        started = time.process_time()
        placement = index.choose(j, draw=0.0)
        if placement is not None:
            index.take(placement.worker_id)
        index_us.append((time.process_time() - started) * 1e6)
    return statistics.median(reference_us), statistics.median(index_us), build_ms


def full_pass(workers: int, queued: int, rng: random.Random) -> dict[str, float]:
    """Seconds per step of one pass over `queued` jobs with `workers` workers in the scheduler's view."""
    view = SchedulerView()
    for n, candidate in enumerate(fleet(workers, rng)):
        registered = WorkerRegistered(
            worker_id=candidate.worker_id, name=candidate.worker_id, region=candidate.region,
            capabilities=candidate.capabilities,
        )
        view.apply_worker_event(registered, seq=n + 1, stored_at_us=1, now_s=0.0)
        view.workers[candidate.worker_id].loaded_models = set(candidate.loaded_models)
        view.workers[candidate.worker_id].memory_free_bytes = candidate.memory_free_bytes
    for n in range(queued):
        view.put_job(job(n, rng))
    steps: dict[str, float] = {}
    started = time.process_time()
    order = view.queued()
    steps["fair order"] = time.process_time() - started
    started = time.process_time()
    candidates = view.candidates()
    steps["candidates"] = time.process_time() - started
    started = time.process_time()
    index = PlacementIndex(candidates.values(), LATENCIES)
    steps["index build"] = time.process_time() - started
    started = time.process_time()
    decisions = plan(order, index, rng.random)
    steps["decide"] = time.process_time() - started
    steps["placed"] = len(decisions)
    return steps


@app.default
def main(
    decisions: Annotated[int, Parameter(help="decisions measured per fleet size")] = 2000,
    queued: Annotated[int, Parameter(help="queued jobs in the full pass")] = 100_000,
    pass_workers: Annotated[int, Parameter(help="workers in the full pass")] = 10_000,
    seed: int = 7,
) -> None:
    rng = random.Random(seed)
    rows = []
    for workers in (100, 1_000, 10_000):
        reference_us, index_us, build_ms = decision_times(workers, decisions, rng)
        rows.append((f"{workers:,}", f"{reference_us:,.0f} µs", f"{index_us:,.1f} µs", f"{build_ms:,.1f} ms"))
    columns = ("workers", "reference (scan)", "index", "index build (once per pass)")
    console.print(figures("one decision (median)", columns, rows))

    steps = full_pass(pass_workers, queued, rng)
    placed = int(steps.pop("placed"))
    table = Table(title=f"one pass: {queued:,} queued, {pass_workers:,} workers, {placed:,} placed")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for step, seconds in steps.items():
        table.add_row(step, f"{seconds:.3f}")
    table.add_row("[b]total[/b]", f"[b]{sum(steps.values()):.3f}[/b]")
    console.print(table)


if __name__ == "__main__":
    app()
