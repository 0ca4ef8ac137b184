"""Replaying the log into the read models, against the ceiling: nats-py simply consuming the same stream.

    python -m bench.replay --jobs 25000                          # 100,000 events (25,000 lifecycles of 4)
    python -m bench.replay --jobs 250000 --store /tmp/replay-1m  # 1 million events, kept for the next run

Fills a nats-server with job lifecycles (submitted, assigned, started, completed) on `jobs.<id>`
(written without nats.conf's fsync per message, which only slows the fill; `--store` keeps the filled
store for later runs), restarts it on nats.conf as shipped, then times, alternating, `rounds` times each:
- **ceiling**: nats-py simply consuming: an ordered push consumer that only counts the messages (the
  fastest nats-py read we found);
- **raw reader**: `sdk.stream_reader.read_stream` (pull batches parsed on a connection of its own), counting;
- **raw reader + decode**: the same, and every payload decoded with the fold's msgspec decoder;
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
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

from cyclopts import Parameter, validators
from nats.aio.client import Client as NatsClient
from nats.js import api as js_api

from bench.cli import bench_app, figures
from projections.feed import BATCH_MAX, FOLDED_STREAMS, log_ends
from projections.replay import rebuild
from projections.store import DECODERS, Store
from sdk import subjects
from sdk.broker import NATS_CONF, EmbeddedNats
from sdk.connection import connect
from sdk.events import JobAssigned, JobCompleted, JobStarted, JobSubmitted, WorkerRegistered, encoder, event_type
from sdk.log import ensure_streams
from sdk.stream_reader import Delivered, read_stream

app, console = bench_app("bench-replay", __doc__, width=130)

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
    last = (await log_ends(nc.jetstream()))[subjects.JOBS_STREAM]
    delivered: list[Delivered] = []
    async with contextlib.aclosing(read_stream(nc, subjects.JOBS_STREAM, last)) as batches:
        async for batch in batches:
            delivered.extend(batch)
    store = await Store.open(db)
    with Timer() as timer:
        for at in range(0, len(delivered), BATCH_MAX):
            await store.apply_batch(delivered[at : at + BATCH_MAX])
    await store.close()
    return len(delivered), timer.wall_s, timer.cpu_s


async def read_raw(nc: NatsClient, decode: bool) -> int:
    """`sdk.stream_reader` over every folded stream, counting (and decoding each payload when `decode`)."""
    ends = await log_ends(nc.jetstream())
    count = 0
    for stream, last_seq in ends.items():
        decoder = DECODERS[stream]
        async with contextlib.aclosing(read_stream(nc, stream, last_seq)) as batches:
            async for batch in batches:
                if decode:
                    for delivered in batch:
                        decoder.decode(delivered.data)
                count += len(batch)
    return count


#: The steps of a round, in order; each returns the number of events it handled.
Step = Callable[[NatsClient, Path, int], Awaitable[int]]


async def _ceiling(nc: NatsClient, scratch: Path, n: int) -> int:
    return sum([await consume(nc, stream) for stream in FOLDED_STREAMS])


async def _raw(nc: NatsClient, scratch: Path, n: int) -> int:
    return await read_raw(nc, decode=False)


async def _raw_decode(nc: NatsClient, scratch: Path, n: int) -> int:
    return await read_raw(nc, decode=True)


async def _rebuild(nc: NatsClient, scratch: Path, n: int) -> int:
    positions = await rebuild(_url(nc), scratch / f"rebuilt-{n}.db")
    return sum(positions.values())


STEPS: dict[str, Step] = {
    "ceiling: nats-py consuming": _ceiling,
    "raw reader (sdk.stream_reader)": _raw,
    "raw reader + msgspec decode": _raw_decode,
    "rebuild: the reading process": _rebuild,
}
FOLDER = "rebuild: its fold process"
FOLD = "fold alone, from memory"


def _url(nc: NatsClient) -> str:
    url = nc.connected_url
    assert url is not None
    return url.geturl()


async def measure(url: str, rounds: int, scratch: Path) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Events per second of wall time and per CPU-second of each step, one entry per round."""
    wall: dict[str, list[float]] = {step: [] for step in [*STEPS, FOLD]}
    cpu: dict[str, list[float]] = {step: [] for step in [*STEPS, FOLDER, FOLD]}
    nc = await connect(url, name="bench-replay")
    try:
        events = sum((await log_ends(nc.jetstream())).values())
        for n in range(rounds):
            for name, step in STEPS.items():
                with Timer() as timer:
                    handled = await step(nc, scratch, n)
                if handled != events:
                    raise RuntimeError(f"{name} handled {handled:,} events of {events:,}")
                wall[name].append(events / timer.wall_s)
                cpu[name].append(events / timer.cpu_s)
                if step is _rebuild:
                    cpu[FOLDER].append(events / timer.children_cpu_s)
            folded, elapsed, cpu_s = await fold_from_memory(nc, scratch / f"folded-{n}.db")
            wall[FOLD].append(folded / elapsed)
            cpu[FOLD].append(folded / cpu_s)
    finally:
        await nc.close()
    return wall, cpu


async def filled(store: Path, jobs: int) -> int:
    """The number of events in `store`, filled with `jobs` lifecycles unless an earlier run did."""
    marker = store / "filled"
    if marker.exists() and marker.read_text() == str(jobs):
        with EmbeddedNats(store / "nats") as server:
            nc = await connect(server.url, name="bench-replay-fill")
            try:
                return sum((await log_ends(nc.jetstream())).values())
            finally:
                await nc.close()
    shutil.rmtree(store / "nats", ignore_errors=True)
    store.mkdir(parents=True, exist_ok=True)
    config = store / "nats-no-fsync.conf"
    config.write_text(NATS_CONF.read_text().replace("sync_interval: always", ""))
    with EmbeddedNats(store / "nats", config=config) as server:
        nc = await connect(server.url, name="bench-replay-fill")
        try:
            await ensure_streams(nc.jetstream())
            start = time.perf_counter()
            events = await fill(nc, jobs)
            console.print(f"filled {events:,} events ({jobs:,} job lifecycles) in {time.perf_counter() - start:.1f}s")
        finally:
            await nc.close()
    marker.write_text(str(jobs))
    return events


async def run(jobs: int, rounds: int, store: Path) -> None:
    events = await filled(store, jobs)
    with EmbeddedNats(store / "nats") as server, tempfile.TemporaryDirectory(prefix="bench-replay-") as scratch:
        wall, cpu = await measure(server.url, rounds, Path(scratch))
    ceiling_wall = statistics.median(wall["ceiling: nats-py consuming"])
    ceiling_cpu = statistics.median(cpu["ceiling: nats-py consuming"])
    rows = []
    for step in cpu:
        rate, per_cpu = (statistics.median(wall[step]) if step in wall else None), statistics.median(cpu[step])
        rows.append((
            step,
            f"{rate:,.0f}" if rate else "",
            f"{rate / ceiling_wall:.2f}" if rate else "",
            f"{per_cpu:,.0f}",
            f"{per_cpu / ceiling_cpu:.2f}",
        ))
    columns = ("step", "events/s (median of rounds)", "÷ ceiling", "events per CPU-second", "÷ ceiling")
    table = figures(f"{events:,} events", columns, rows)
    console.print(table)
    console.print("rounds (events/s): " + "; ".join(f"{k} {', '.join(f'{v:,.0f}' for v in vs)}" for k, vs in wall.items()))
    rebuild_rate = statistics.median(wall["rebuild: the reading process"])
    console.print(f"{events:,} events: rebuild {events / rebuild_rate:.2f}s (median); load average {os.getloadavg()[0]:.1f}")


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
    store: Path | None = None,
) -> None:
    """Fill a server with JOBS lifecycles (or reuse `store`, filled by an earlier run with as many jobs),
    then time the ceiling, the raw reader, the rebuild and the fold alone."""
    if store is not None:
        asyncio.run(run(jobs, rounds, store))
        return
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        asyncio.run(run(jobs, rounds, Path(tmp)))


if __name__ == "__main__":
    app()
