"""The scheduler alone: how many jobs a second it places when fed events, with every append as shipped
(fsync before the ack, the expected sequence on every `JobAssigned`, a dispatch per job).

    python -m bench.scheduler_feed --jobs 10000 --workers 10

A `nats-server` as `nats.conf` configures it and a scheduler process (`python -m scheduler`); nothing
else of the platform runs. The benchmark appends `--jobs` submissions while no worker exists (they
queue), waits until the scheduler has folded them (its CPU time stops moving), then registers
`--workers` echo workers with 1,024 slots each and one heartbeat each, and counts the `JobAssigned`
events until every job is placed. Placement rate = jobs / (first registration to last assignment); the
scheduler's CPU time over the same span is shown per job.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

from cyclopts import App, Parameter
from nats.aio.msg import Msg
from rich.console import Console
from rich.table import Table

from bench.procstat import cpu_s
from sdk import subjects
from sdk.broker import EmbeddedNats
from sdk.connection import connect
from sdk.events import Heartbeat, JobSubmitted, WorkerRegistered, encoder, event_type
from sdk.log import append, ensure_streams
from sdk.process import Child

app = App(name="bench-scheduler", help=__doc__)
console = Console(width=120)

#: The most slots one worker may have (`sdk.api.workers`: max_concurrency <= 1024).
SLOTS_PER_WORKER = 1024


async def _settled(pid: int, quiet_s: float = 1.0, timeout_s: float = 120.0) -> None:
    """Return once the process has used no CPU for `quiet_s` (it has folded what it was sent)."""
    deadline = time.monotonic() + timeout_s
    last = cpu_s(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet_s)
        now = cpu_s(pid)
        if now - last < 0.02:
            return
        last = now
    raise RuntimeError("the scheduler never went quiet")


async def bench(jobs: int, workers: int) -> tuple[float, float]:
    if jobs > workers * SLOTS_PER_WORKER:
        raise SystemExit(f"{workers} workers hold at most {workers * SLOTS_PER_WORKER} jobs; add --workers")
    with tempfile.TemporaryDirectory() as data_dir:
        broker = EmbeddedNats(Path(data_dir) / "nats", log_file=Path(data_dir) / "nats-server.log")
        broker.start()
        scheduler = Child("scheduler", [sys.executable, "-m", "scheduler"], Path(data_dir) / "scheduler.log",
                          env={"NATS_URL": broker.url})
        try:
            nc = await connect(broker.url, name="bench-scheduler")
            js = nc.jetstream()
            await ensure_streams(js)
            config = await js.key_value(subjects.WORKER_CONFIG_BUCKET)
            await config.put("_defaults", encoder.encode({"max_concurrency": SLOTS_PER_WORKER}))
            scheduler.start()
            assert scheduler.process is not None
            for i in range(jobs):
                event = JobSubmitted(job_id=f"bench{i:08d}", job_type="echo", params={"i": i})
                await js.publish_async(subjects.job_subject(event.job_id), encoder.encode(event),
                                       headers={subjects.EVENT_TYPE_HEADER: event_type(event)})
            await js.publish_async_completed()
            await _settled(scheduler.process.pid)

            placed = asyncio.Event()
            assigned = 0

            async def count(msg: Msg) -> None:
                nonlocal assigned
                if (msg.headers or {}).get(subjects.EVENT_TYPE_HEADER) == "job.assigned":
                    assigned += 1
                    if assigned == jobs:
                        placed.set()

            sub = await nc.subscribe(subjects.JOBS_SUBJECTS, cb=count)
            cpu_before = cpu_s(scheduler.process.pid)
            start = time.perf_counter()
            for n in range(workers):
                worker_id = f"bench-w{n}"
                await append(js, subjects.worker_subject(worker_id),
                             WorkerRegistered(worker_id=worker_id, name=worker_id, region="local"))
                beat = Heartbeat(worker_id=worker_id, region="local", max_concurrency=SLOTS_PER_WORKER)
                await js.publish(subjects.heartbeat_subject("local", worker_id), encoder.encode(beat))
            await asyncio.wait_for(placed.wait(), 300)
            elapsed_s = time.perf_counter() - start
            cpu_ms_per_job = (cpu_s(scheduler.process.pid) - cpu_before) * 1000 / jobs
            await sub.unsubscribe()
            await nc.close()
        finally:
            scheduler.stop()
            broker.stop()
    return jobs / elapsed_s, cpu_ms_per_job


@app.default
def main(
    *,
    jobs: Annotated[int, Parameter(help="jobs queued before any worker exists")] = 10_000,
    workers: Annotated[int, Parameter(help=f"echo workers, {SLOTS_PER_WORKER} slots each")] = 10,
) -> None:
    rate, cpu_ms = asyncio.run(bench(jobs, workers))
    table = Table(title=f"the scheduler alone: {jobs:,} queued jobs, {workers} workers (fsync before every ack)")
    table.add_column("measure")
    table.add_column("value")
    table.add_row("jobs placed per second (appended JobAssigned + dispatch)", f"{rate:,.0f}")
    table.add_row("scheduler CPU ms per job", f"{cpu_ms:.3f}")
    console.print(table)


if __name__ == "__main__":
    app()
