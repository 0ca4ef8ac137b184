"""A steady load for a given time, watching every process's memory: does anything grow per job?

    python -m bench.soak --rate 20 --minutes 15

Starts a stack (as `gpuctl up` does, one echo worker), then starts `rate` echo jobs a second over HTTP
(submit, then wait for the result), whatever the latency, for `minutes`. Each interval it prints the
jobs finished, their latency and each process's resident memory (RSS, from /proc: Linux). At the end
it compares every process's RSS after the warm-up with its highest later value.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cyclopts import Parameter
from rich.table import Table

from bench.cli import bench_app, figures
from bench.echo_throughput import echo_stack, percentile
from sdk.errors import PlatformError
from sdk.http import HttpClient
from sdk.local import LocalStack

app, console = bench_app("bench-soak", __doc__, width=120)

#: Jobs in flight beyond which the load waits instead of piling up (the platform fell behind).
MAX_IN_FLIGHT = 512


def rss_mb(pid: int) -> float:
    """A process's resident set size in MB (0 once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0.0
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return kb / 1024


def processes(stack: LocalStack) -> dict[str, int]:
    pids = {name: child.process.pid for name, child in stack.children.items() if child.process is not None}
    if stack.broker is not None and stack.broker.process is not None:
        pids["nats-server"] = stack.broker.process.pid
    return pids


@Parameter(name="*")
@dataclass(frozen=True, kw_only=True)
class Load:
    """The soak's load and how its figures are taken (each field is a command-line option)."""

    rate: float = 20.0
    """echo jobs started per second"""
    minutes: float = 10.0
    """how long the load runs"""
    interval_s: float = 60.0
    """seconds between two rows of figures"""
    warmup_minutes: float = 2.0
    """RSS growth is measured from the row after this"""
    worker_concurrency: int = 64
    """the echo worker's max_concurrency"""


@dataclass
class Interval:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0


async def soak(load: Load) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        async with (
            echo_stack(Path(data_dir), 1, load.worker_concurrency) as (stack, _),
            HttpClient(stack.http_url, api_key=stack.operator_key) as http,
        ):
            await run(stack, http, load)


async def run(stack: LocalStack, http: HttpClient, load: Load) -> None:
    rate, duration_s, interval_s = load.rate, load.minutes * 60, load.interval_s
    pids = processes(stack)
    header = ("min", "jobs", "jobs/s", "p50 ms", "p99 ms", "errors", *pids)
    in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
    current = Interval()
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        sample = current
        start = time.perf_counter()
        try:
            job = await http.submit("echo", params={"i": i})
            done = await http.wait(job.id, timeout_s=60)
            if done.status != "completed":
                raise RuntimeError(f"job {job.id} {done.status}")
            sample.latencies_ms.append((time.perf_counter() - start) * 1000)
        except (PlatformError, RuntimeError) as exc:
            sample.errors += 1
            console.print(f"[red]job {i}: {exc}")
        finally:
            in_flight.release()

    rows: list[tuple[str, ...]] = []
    memory_rows: list[dict[str, float]] = []
    began = time.monotonic()
    next_report = began + interval_s
    sent = 0
    while len(rows) < max(1, math.ceil(duration_s / interval_s)):
        now = time.monotonic()
        # Open loop: the schedule says how many jobs should have started by now, however slow they are.
        for _ in range(int(min(now - began, duration_s) * rate) - sent):
            await in_flight.acquire()
            task = asyncio.create_task(one(sent))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        if now >= next_report:
            finished, current = current, Interval()
            memory = {name: rss_mb(pid) for name, pid in pids.items()}
            memory_rows.append({"t": now - began, **memory})
            lat = finished.latencies_ms
            rows.append((
                f"{(now - began) / 60:.1f}", str(len(lat)), f"{len(lat) / interval_s:.1f}",
                f"{percentile(lat, 50):.0f}" if lat else "-", f"{percentile(lat, 99):.0f}" if lat else "-",
                str(finished.errors), *(f"{mb:.1f}" for mb in memory.values()),
            ))
            console.print("  ".join(f"{name}={value}" for name, value in zip(header, rows[-1], strict=True)))
            next_report += interval_s
        await asyncio.sleep(min(0.05, 1 / rate))
    await asyncio.gather(*tasks)
    console.print(figures(f"soak: {rate:g} echo jobs/s over HTTP (submit, then wait), RSS in MB", header, rows))
    console.print(growth(memory_rows, list(pids), load.warmup_minutes * 60))


def growth(rows: list[dict[str, float]], names: list[str], warmup_s: float) -> Table:
    """Each process's RSS at the end of the warm-up against its highest value after it."""
    after = [row for row in rows if row["t"] >= warmup_s]
    changes = []
    if len(after) >= 2:  # a single row has nothing to be compared with
        for name in names:
            base, peak = after[0][name], max(row[name] for row in after[1:])
            growth_pct = f"{(peak - base) / base * 100:+.1f} %" if base else "-"
            changes.append((name, f"{base:.1f}", f"{peak:.1f}", growth_pct))
    columns = ("process", "after warm-up MB", "highest later MB", "growth")
    return figures(f"RSS growth after a {warmup_s / 60:g}-minute warm-up", columns, changes)


@app.default
def main(load: Load = Load()) -> None:
    asyncio.run(soak(load))


if __name__ == "__main__":
    app()
