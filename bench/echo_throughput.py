"""Echo jobs through the whole platform (SDK -> gateway -> scheduler -> worker -> gateway -> SDK), next
to the raw JetStream limit measured on the same server in the same run.

    python -m bench.echo_throughput --jobs 2000 --concurrency 64

Prints jobs/s, submit-to-completed latency percentiles (at concurrency 1 and under load), and the
acknowledged publishes/s of an event-sized message with nats-py, as a ratio.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import httpx
from cyclopts import Parameter

from bench.cli import bench_app, figures
from sdk.broker import NATS_CONF
from sdk.client import Client
from sdk.connection import connect
from sdk.events import JobSubmitted, encoder
from sdk.http import HttpClient
from sdk.local import LocalStack

app, console = bench_app("bench-echo", __doc__)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def raw_jetstream(nats_url: str, count: int) -> tuple[float, float]:
    """Acked publishes/s of an event-sized message: one at a time, and pipelined with publish_async."""
    nc = await connect(nats_url, name="bench-raw")
    js = nc.jetstream()
    await js.add_stream(name="BENCH", subjects=["bench.*"])
    body = encoder.encode(JobSubmitted(job_id="0" * 27, job_type="echo", params={"n": 1}))
    start = time.perf_counter()
    for i in range(count):
        await js.publish(f"bench.{i}", body)
    sequential = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(count):
        await js.publish_async(f"bench.{i}", body)
    await js.publish_async_completed()
    pipelined = count / (time.perf_counter() - start)
    await js.delete_stream("BENCH")
    await nc.close()
    return sequential, pipelined


async def run_jobs(client: Client, count: int, concurrency: int) -> tuple[float, list[float]]:
    latencies_ms: list[float] = []
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with semaphore:
            start = time.perf_counter()
            job = await client.submit("echo", params={"i": i})
            done = await client.wait(job.id, timeout_s=120)
            assert done.status == "completed", done
            latencies_ms.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return count / (time.perf_counter() - start), latencies_ms


def without_fsync(data_dir: Path) -> Path:
    """nats.conf as shipped, less `sync_interval: always`: what the per-write fsync costs."""
    text = NATS_CONF.read_text()
    assert "sync_interval: always" in text
    variant = data_dir / "nats-no-fsync.conf"
    variant.write_text(text.replace("sync_interval: always", ""))
    return variant


@contextlib.asynccontextmanager
async def echo_stack(data_dir: Path, workers: int, worker_concurrency: int, fsync: bool = True) -> AsyncIterator[tuple[LocalStack, Client]]:
    """A stack as `gpuctl up` runs it with `workers` echo workers online, and an operator's client."""
    stack = LocalStack(data_dir)
    if not fsync:
        assert stack.broker is not None
        stack.broker.config = without_fsync(data_dir)
    stack.start()
    try:
        async with httpx.AsyncClient(base_url=stack.http_url) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("gateway did not come up")
                await asyncio.sleep(0.1)
        async with HttpClient(stack.http_url, api_key=stack.operator_key) as operator:
            await operator.set_config_defaults({"max_concurrency": worker_concurrency})
        for n in range(workers):
            stack.start_worker(f"bench{n}", "local", "--engines", "echo")
        client = await Client.connect(stack.nats_url, api_key=stack.operator_key)
        try:
            while len([w for w in await client.workers() if w.status == "online"]) < workers:
                await asyncio.sleep(0.2)
            yield stack, client
        finally:
            await client.close()
    finally:
        stack.stop()


async def bench(jobs: int, concurrency: int, workers: int, worker_concurrency: int, fsync: bool) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        async with echo_stack(Path(data_dir), workers, worker_concurrency, fsync) as (stack, client):
            await run_jobs(client, 100, concurrency)  # warm up every path
            _, single = await run_jobs(client, 200, 1)
            rate, loaded = await run_jobs(client, jobs, concurrency)
            sequential, pipelined = await raw_jetstream(stack.nats_url, 5000)

    sync = "fsync before every ack" if fsync else "no per-write fsync"
    latencies = " / ".join(f"{percentile(single, q):.1f}" for q in (50, 95, 99))
    latencies_loaded = " / ".join(f"{percentile(loaded, q):.1f}" for q in (50, 95, 99))
    rows = [
        ("jobs/s (concurrency %d, %d jobs)" % (concurrency, jobs), f"{rate:,.0f}"),
        ("latency p50 / p95 / p99, concurrency 1 (ms)", latencies),
        (f"latency p50 / p95 / p99, concurrency {concurrency} (ms)", latencies_loaded),
        ("mean latency, concurrency 1 (ms)", f"{statistics.fmean(single):.1f}"),
        ("raw JetStream acked publishes/s, one at a time", f"{sequential:,.0f}"),
        ("raw JetStream acked publishes/s, pipelined", f"{pipelined:,.0f}"),
        ("jobs/s ÷ pipelined publishes/s", f"{rate / pipelined:.3f}"),
    ]
    title = f"echo jobs through the platform ({workers} worker(s), max_concurrency {worker_concurrency}, {sync})"
    table = figures(title, ("measure", "value"), rows, justify="left")
    console.print(table)


@app.default
def main(
    *,
    jobs: Annotated[int, Parameter(help="jobs in the loaded run")] = 2000,
    concurrency: Annotated[int, Parameter(help="jobs in flight at once")] = 64,
    workers: int = 1,
    worker_concurrency: int = 64,
    fsync: Annotated[bool, Parameter(help="keep nats.conf's `sync_interval: always` (--no-fsync drops it)")] = True,
) -> None:
    asyncio.run(bench(jobs, concurrency, workers, worker_concurrency, fsync))


if __name__ == "__main__":
    app()
