"""Replaying the log into the read models, against the ceiling: nats-py simply consuming the same stream.

    python -m bench.replay --jobs 25000            # 100,000 events (25,000 job lifecycles of 4 events)
    python -m bench.replay --jobs 250000           # 1 million events

Fills a fresh nats-server (nats.conf as shipped) with job lifecycles (submitted, assigned, started,
completed) on `jobs.<id>`, then, in the same run and alternating, `rounds` times each:
- **ceiling**: an ordered push consumer that only counts the messages (the fastest nats-py read we found);
- **rebuild**: `projections.replay.rebuild` into a fresh SQLite file, the whole of `gpuctl replay`;
- **fold**: the same events already in memory, through `Store.apply_batch` in batches of `BATCH_MAX`
  (the SQLite and fold side alone, no NATS).
Each step shows events per second of wall time and per CPU-second (of this process; for the rebuild also
of its fold process, `projections.refold`, which runs beside the reader). On a shared, loaded machine
wall time depends on the neighbours: compare the ratios to the ceiling of one run, not absolute figures
across runs, and read the CPU columns as what each process needs.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated

from cyclopts import App, Parameter, validators
from nats.aio.client import Client as NatsClient
from nats.js import api as js_api
from rich.console import Console
from rich.table import Table

from projections.feed import BATCH_MAX, FOLDED_STREAMS, Feed, follow
from projections.replay import rebuild
from projections.store import Store
from sdk import subjects
from sdk.broker import EmbeddedNats
from sdk.connection import connect
from sdk.events import JobAssigned, JobCompleted, JobStarted, JobSubmitted, WorkerRegistered, encoder, event_type
from sdk.log import ensure_streams

app = App(name="bench-replay", help=__doc__)
console = Console()

#: Core publishes between flushes while filling (JetStream stores core publishes on its subjects too).
FILL_FLUSH_EVERY = 2_000


async def fill(nc: NatsClient, jobs: int) -> int:
    """Publish `jobs` lifecycles (and the worker they ran on); return the number of events stored."""
    js = nc.jetstream()
    worker = WorkerRegistered(worker_id="w-bench", name="bench", region="local", capabilities=("echo",))
    await js.publish(subjects.worker_subject(worker.worker_id), encoder.encode(worker))
    for n in range(jobs):
        job_id = f"job-{n:08d}"
        subject = subjects.job_subject(job_id)
        for event in (
            JobSubmitted(job_id=job_id, job_type="echo", params={"text": f"hello {n}"}, owner="key-bench"),
            JobAssigned(job_id=job_id, worker_id=worker.worker_id, region="local", attempt=1),
            JobStarted(job_id=job_id, worker_id=worker.worker_id, attempt=1),
            JobCompleted(job_id=job_id, worker_id=worker.worker_id, attempt=1, result={"text": f"hello {n}"}),
        ):
            await nc.publish(subject, encoder.encode(event), headers={subjects.EVENT_TYPE_HEADER: event_type(event)})
        if n % (FILL_FLUSH_EVERY // 4) == 0:
            await nc.flush()
    await nc.flush()
    total = 4 * jobs + 1
    while sum([(await js.stream_info(s)).state.messages for s in FOLDED_STREAMS]) < total:
        await asyncio.sleep(0.2)
    return total


async def consume(nc: NatsClient, stream: str) -> int:
    """The ceiling: an ordered consumer that counts the stream's messages and does nothing else."""
    js = nc.jetstream()
    last = (await js.stream_info(stream)).state.messages
    if not last:
        return 0
    done = asyncio.Event()
    count = 0

    async def counted(_msg: object) -> None:
        nonlocal count
        count += 1
        if count == last:
            done.set()

    sub = await js.subscribe(
        FOLDED_STREAMS[stream], stream=stream, cb=counted, ordered_consumer=True,
        config=js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL),
    )
    await done.wait()
    await sub.unsubscribe()
    return count


async def fold_from_memory(nc: NatsClient, db: Path) -> tuple[int, float, float]:
    """Read JOBS into memory first, then time only the fold into a fresh database."""
    feed = Feed(size=10**9)
    last = (await nc.jetstream().stream_info(subjects.JOBS_STREAM)).state.messages
    sub = await follow(nc.jetstream(), subjects.JOBS_STREAM, 0, feed)
    while len(feed) < last:
        await asyncio.sleep(0.05)
    await sub.unsubscribe()
    delivered = await feed.take(last)
    store = await Store.open(db)
    with Timer() as timer:
        for at in range(0, len(delivered), BATCH_MAX):
            await store.apply_batch(delivered[at : at + BATCH_MAX])
    await store.close()
    return len(delivered), timer.wall_s, timer.cpu_s


async def run(jobs: int, rounds: int, nats_dir: Path) -> None:
    with EmbeddedNats(nats_dir) as server:
        nc = await connect(server.url, name="bench-replay")
        try:
            await ensure_streams(nc.jetstream())
            start = time.perf_counter()
            events = await fill(nc, jobs)
            console.print(f"filled {events:,} events ({jobs:,} job lifecycles) in {time.perf_counter() - start:.1f}s")
            wall: dict[str, list[float]] = {"ceiling": [], "rebuild": [], "fold": []}
            cpu: dict[str, list[float]] = {"ceiling": [], "rebuild": [], "fold": [], "rebuild's folder": []}
            for n in range(rounds):
                with Timer() as timer:
                    read = sum([await consume(nc, stream) for stream in FOLDED_STREAMS])
                wall["ceiling"].append(read / timer.wall_s)
                cpu["ceiling"].append(read / timer.cpu_s)
                with Timer() as timer:
                    await rebuild(server.url, nats_dir.parent / f"rebuilt-{n}.db")
                wall["rebuild"].append(events / timer.wall_s)
                cpu["rebuild"].append(events / timer.cpu_s)
                cpu["rebuild's folder"].append(events / timer.children_cpu_s)
                folded, elapsed, cpu_s = await fold_from_memory(nc, nats_dir.parent / f"folded-{n}.db")
                wall["fold"].append(folded / elapsed)
                cpu["fold"].append(folded / cpu_s)
        finally:
            await nc.close()
    ceiling_wall = statistics.median(wall["ceiling"])
    ceiling_cpu = statistics.median(cpu["ceiling"])
    table = Table(
        "step", "events/s (median of rounds)", "÷ ceiling", "events per CPU-second", "÷ ceiling", title=f"{events:,} events"
    )
    for step in cpu:
        rate, per_cpu = (statistics.median(wall[step]) if step in wall else None), statistics.median(cpu[step])
        table.add_row(
            step,
            f"{rate:,.0f}" if rate else "",
            f"{rate / ceiling_wall:.2f}" if rate else "",
            f"{per_cpu:,.0f}",
            f"{per_cpu / ceiling_cpu:.2f}",
        )
    console.print(table)
    console.print("rounds (events/s): " + "; ".join(f"{k} {', '.join(f'{v:,.0f}' for v in vs)}" for k, vs in wall.items()))
    console.print(f"{events:,} events: rebuild {events / statistics.median(wall['rebuild']):.2f}s (median)")


class Timer:
    """Wall time, this process's CPU time and its children's (the rebuild's fold process) over a block."""

    def __enter__(self) -> Timer:
        self._start = time.perf_counter(), time.process_time(), _children_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        wall, cpu, children = self._start
        self.wall_s = time.perf_counter() - wall
        self.cpu_s = time.process_time() - cpu
        self.children_cpu_s = _children_cpu_s() - children


def _children_cpu_s() -> float:
    times = os.times()
    return times.children_user + times.children_system


@app.default
def main(
    *,
    jobs: Annotated[int, Parameter(validator=validators.Number(gte=1))] = 25_000,
    rounds: Annotated[int, Parameter(validator=validators.Number(gte=1))] = 3,
) -> None:
    """Fill a fresh server with JOBS lifecycles, then time the ceiling, the rebuild and the fold alone."""
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        asyncio.run(run(jobs, rounds, Path(tmp) / "nats"))


if __name__ == "__main__":
    app()
