"""The scheduler alone: how many jobs a second it places when fed events, with every append as shipped
(fsync before the ack, the expected sequence on every `JobAssigned`, a dispatch per job).

    python -m bench.scheduler_feed --jobs 10000 --workers 10

A `nats-server` as `nats.conf` configures it and a scheduler process (`python -m scheduler`); nothing
else of the platform runs. The benchmark appends `--jobs` submissions while no worker exists (they
queue), waits until the scheduler has folded them (its CPU time stops moving), then registers
`--workers` echo workers with 1,024 slots each and one heartbeat each, and waits until every job's
`JobAssigned` is in the log and its dispatch is in DISPATCH. Placement rate = jobs / (first registration
to the last of those); the scheduler's and the server's CPU time over the same span are shown per job.

The ceiling line, measured in the same run on the same server once the scheduler has stopped: the same
number of appends through the same group commit (atomic batches, an expected sequence on each) and
dispatch publishes, from one nats-py client with no scheduling at all: what the server and nats-py allow.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

from cyclopts import Parameter
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bench.cli import bench_app, figures
from bench.procstat import cpu_s
from sdk import subjects
from sdk.broker import EmbeddedNats
from sdk.connection import connect
from sdk.events import Assignment, Heartbeat, JobAssigned, JobSubmitted, WorkerRegistered, encoder, event_type
from sdk.group_commit import GroupCommit
from sdk.log import append, ensure_streams
from sdk.process import Child

app, console = bench_app("bench-scheduler", __doc__, width=120)

#: The most slots one worker may have (`sdk.api.workers`: max_concurrency <= 1024).
SLOTS_PER_WORKER = 1024


async def _settled(pid: int, quiet_s: float = 1.0, timeout_s: float = 120.0) -> None:
    """Return once the process has used under a tenth of a core for `quiet_s`: it has folded what it was
    sent (folding takes a whole core; an idle leader's sweeps over a long queue take a few percent)."""
    deadline = time.monotonic() + timeout_s
    last = cpu_s(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet_s)
        now = cpu_s(pid)
        if now - last < 0.1 * quiet_s:
            return
        last = now
    raise RuntimeError("the scheduler never went quiet")


class Placed:
    """Counts, from core subscriptions, the jobs whose assignment is in JOBS and whose dispatch is in DISPATCH."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.assigned = 0
        self.dispatched: set[str] = set()  # by message id: a dispatch sent again counts once
        self.done = asyncio.Event()

    async def on_job(self, msg: Msg) -> None:
        if (msg.headers or {}).get(subjects.EVENT_TYPE_HEADER) == "job.assigned":
            self.assigned += 1
            self._check()

    async def on_dispatch(self, msg: Msg) -> None:
        self.dispatched.add((msg.headers or {}).get(subjects.MSG_ID_HEADER, ""))
        self._check()

    def _check(self) -> None:
        if self.assigned >= self.jobs and len(self.dispatched) >= self.jobs:
            self.done.set()


async def ceiling(js: JetStreamContext, jobs: int) -> float:
    """Jobs/s for `jobs` raw appends (group commit, expected sequence: a new subject each) plus their
    dispatch publishes, pipelined; no scheduler."""
    log = GroupCommit(js)

    async def one(i: int) -> None:
        job_id = f"ceiling{i:08d}"
        event = JobAssigned(job_id=job_id, worker_id="bench-w0", region="local", attempt=1, rank="ceiling")
        await log.append(subjects.job_subject(job_id), event, expected_seq=0)
        order = Assignment(job_id=job_id, attempt=1, job_type="echo", model=None, params={"i": i}, timeout_s=60)
        await js.publish_async(subjects.dispatch_subject("local", "ceiling"), encoder.encode(order),
                               headers={subjects.MSG_ID_HEADER: f"assign-{job_id}-1"})

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(jobs)))
    await js.publish_async_completed()
    return jobs / (time.perf_counter() - start)


async def bench(jobs: int, workers: int) -> dict[str, float]:
    if jobs > workers * SLOTS_PER_WORKER:
        raise SystemExit(f"{workers} workers hold at most {workers * SLOTS_PER_WORKER} jobs; add --workers")
    with tempfile.TemporaryDirectory() as data_dir:
        broker = EmbeddedNats(Path(data_dir) / "nats", log_file=Path(data_dir) / "nats-server.log")
        broker.start()
        assert broker.process is not None
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

            placed = Placed(jobs)
            subs = [await nc.subscribe(subjects.JOBS_SUBJECTS, cb=placed.on_job),
                    await nc.subscribe(subjects.DISPATCH_SUBJECTS, cb=placed.on_dispatch)]
            cpu_before = cpu_s(scheduler.process.pid), cpu_s(broker.process.pid)
            start = time.perf_counter()
            for n in range(workers):
                worker_id = f"bench-w{n}"
                await append(js, subjects.worker_subject(worker_id),
                             WorkerRegistered(worker_id=worker_id, name=worker_id, region="local"))
                beat = Heartbeat(worker_id=worker_id, region="local", max_concurrency=SLOTS_PER_WORKER)
                await js.publish(subjects.heartbeat_subject("local", worker_id), encoder.encode(beat))
            await asyncio.wait_for(placed.done.wait(), 300)
            elapsed_s = time.perf_counter() - start
            figures = {
                "rate": jobs / elapsed_s,
                "scheduler_cpu_ms": (cpu_s(scheduler.process.pid) - cpu_before[0]) * 1000 / jobs,
                "server_cpu_ms": (cpu_s(broker.process.pid) - cpu_before[1]) * 1000 / jobs,
            }
            for sub in subs:
                await sub.unsubscribe()
            scheduler.stop()
            figures["ceiling"] = await ceiling(js, jobs)
            await nc.close()
        finally:
            scheduler.stop()
            broker.stop()
    return figures


@app.default
def main(
    *,
    jobs: Annotated[int, Parameter(help="jobs queued before any worker exists")] = 10_000,
    workers: Annotated[int, Parameter(help=f"echo workers, {SLOTS_PER_WORKER} slots each")] = 10,
) -> None:
    found = asyncio.run(bench(jobs, workers))
    rows = [
        ("jobs placed per second (JobAssigned appended + dispatch stored)", f"{found['rate']:,.0f}"),
        ("scheduler CPU ms per job", f"{found['scheduler_cpu_ms']:.3f}"),
        ("nats-server CPU ms per job", f"{found['server_cpu_ms']:.3f}"),
        ("ceiling: the same appends + dispatches, no scheduler (jobs/s)", f"{found['ceiling']:,.0f}"),
        ("placement rate / ceiling", f"{found['rate'] / found['ceiling']:.2f}"),
    ]
    title = f"the scheduler alone: {jobs:,} queued jobs, {workers} workers (fsync before every ack)"
    console.print(figures(title, ("measure", "value"), rows, justify="left"))

if __name__ == "__main__":
    app()
