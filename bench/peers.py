"""The same no-op job on this platform, Celery + Redis and taskiq + JetStream, back to back in one run.

    just bench-peers                      # installs the peers (the `bench` extra, Debian's redis-server)
    python -m bench.peers --jobs 2000 --rounds 3

Each system gets the same workload: a burst of `--jobs` jobs (submitted with at most `--concurrency`
submissions outstanding, then every result collected; jobs/s = jobs / first submit to last result),
then `--single` jobs one at a time (latency: submit to completed as the client sees it). Between the
warm-up and the burst each process's CPU time is read from /proc, so the table also shows the CPU
milliseconds one job costs each process. Only ratios within one run count: the machine is shared.

- the platform: a stack as `gpuctl up` runs it (`bench.echo_throughput.echo_stack`), fsync before every
  ack, auth on, one echo worker with `max_concurrency` 64;
- Celery 5 with Redis as broker and result backend, prefork with 2 processes, late acks;
- taskiq with a JetStream pull consumer and results in Redis (`bench.peer_apps` says why), 2 worker
  processes, a plain `nats-server -js` (without the platform's per-write fsync).

With `--profile-dir` each Python process of the platform is sampled by `py-spy` during the burst.
Every process started here is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from cyclopts import Parameter
from rich.table import Table

from bench.cli import bench_app
from bench.echo_throughput import echo_stack, percentile
from bench.hops import HOPS, job_hops
from bench.peer_apps import (
    PEER_NATS_URL_ENV,
    REDIS_URL_ENV,
    celery_app,
    celery_echo,
    configure,
    taskiq_broker,
    taskiq_echo,
)
from bench.procstat import cpu_s, descendants, tree_cpu_s
from sdk.broker import free_port, nats_server_binary
from sdk.connection import port_open
from sdk.process import Child, stop_all

app, console = bench_app("bench-peers", __doc__, width=150)

#: Jobs run on each system before anything is measured (imports, connections, consumers).
WARMUP_JOBS = 50
#: How often taskiq's client looks for a result (it polls the result backend); 1 ms one at a time.
TASKIQ_POLL_S = 0.001


@dataclass
class Run:
    system: str
    jobs_per_s: float = 0.0
    single_ms: list[float] = field(default_factory=list)
    #: CPU milliseconds per job of the burst, per process (the client included).
    cpu_ms_per_job: dict[str, float] = field(default_factory=dict)
    #: One at a time: median ms of each hop, from the log's own timestamps (the platform only).
    hops_ms: dict[str, float] = field(default_factory=dict)

    @property
    def p50_ms(self) -> float:
        return percentile(self.single_ms, 50)

    @property
    def total_cpu_ms(self) -> float:
        return sum(self.cpu_ms_per_job.values())


class CpuMeter:
    """CPU seconds of named processes (each with its children) between `start` and `stop`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {"client": os.getpid(), **pids}
        self._before: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        return {name: cpu_s(pid) if name == "client" else tree_cpu_s(pid) for name, pid in self.pids.items()}

    def start(self) -> None:
        self._before = self._read()

    def per_job_ms(self, jobs: int) -> dict[str, float]:
        after = self._read()
        return {name: (after[name] - self._before[name]) * 1000 / jobs for name in self.pids}


def _child(name: str, cmd: list[str], logs: Path, env: dict[str, str] | None = None) -> Child:
    child = Child(name, cmd, logs / f"{name}.log", env)
    child.start()
    return child


def _stop(children: list[Child]) -> None:
    """Stop each child by its PID, then any process it left behind (a pool's workers), by theirs."""
    left = [pid for child in children if child.process is not None for pid in descendants(child.process.pid)]
    stop_all(children, timeout_s=10)
    for pid in left:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def _wait_port(port: int, child: Child, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_open("127.0.0.1", port):
        if not child.running or time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} did not listen on {port} ({child.state}; see {child.log_path})")
        time.sleep(0.05)


async def _timed(count: int, concurrency: int, submit: Callable[[int], Awaitable[object]],
                 collect: Callable[[object], Awaitable[None]]) -> float:
    """Jobs/s of a burst: submit all (at most `concurrency` outstanding), then collect every result."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> object:
        async with gate:
            return await submit(i)

    start = time.perf_counter()
    handles = await asyncio.gather(*(one(i) for i in range(count)))
    for handle in handles:
        await collect(handle)
    return count / (time.perf_counter() - start)


# --- The platform -------------------------------------------------------------------------------------------


@contextmanager
def _profiled(pids: dict[str, int], profile_dir: Path | None) -> Iterator[None]:
    """py-spy sampling each process while the block runs (raw folded stacks, `<name>.txt`)."""
    if profile_dir is None or shutil.which("py-spy") is None:
        yield
        return
    profile_dir.mkdir(parents=True, exist_ok=True)
    spies = [
        subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--nonblocking",
                          "--output", str(profile_dir / f"{name}.txt")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, pid in pids.items() if name != "nats-server"
    ]
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
        for spy in spies:
            try:
                spy.wait(timeout=20)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()


async def platform_run(jobs: int, single: int, concurrency: int, profile_dir: Path | None) -> Run:
    run = Run("gpu-fabric")
    with tempfile.TemporaryDirectory() as data_dir:
        async with echo_stack(Path(data_dir), 1, 64) as (stack, client):

            async def submit(i: int) -> str:
                return (await client.submit("echo", params={"i": i})).id

            async def collect(job_id: object) -> None:
                done = await client.wait(str(job_id), timeout_s=120)
                assert done.status == "completed", done

            await _timed(WARMUP_JOBS, concurrency, submit, collect)
            pids = {name: c.process.pid for name, c in stack.children.items() if c.process is not None}
            meter = CpuMeter(pids)
            meter.start()
            with _profiled(meter.pids, profile_dir):
                run.jobs_per_s = await _timed(jobs, concurrency, submit, collect)
            run.cpu_ms_per_job = meter.per_job_ms(jobs)
            started_ns: list[int] = []

            async def submit_at(i: int) -> str:
                started_ns.append(time.time_ns())
                return await submit(i)

            async def collect_at(job_id: object) -> None:
                await collect(job_id)
                ended.append((str(job_id), started_ns[-1], time.time_ns()))

            ended: list[tuple[str, int, int]] = []
            run.single_ms = await _one_at_a_time(single, submit_at, collect_at)
            run.hops_ms = await job_hops(stack.nats_url, ended)
    return run


async def _one_at_a_time(count: int, submit: Callable[[int], Awaitable[object]],
                         collect: Callable[[object], Awaitable[None]]) -> list[float]:
    latencies_ms = []
    for i in range(count):
        start = time.perf_counter()
        await collect(await submit(i))
        latencies_ms.append((time.perf_counter() - start) * 1000)
    return latencies_ms


# --- Celery + Redis --------------------------------------------------------------------------------------


def _redis(port: int, work_dir: Path) -> Child:
    redis = _child("redis-server", [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", str(work_dir)], work_dir)
    _wait_port(port, redis)
    return redis


def celery_run(jobs: int, single: int, work_dir: Path, env: dict[str, str]) -> Run:
    run = Run("Celery+Redis")
    redis = _redis(int(env[REDIS_URL_ENV].rsplit(":", 1)[1].split("/")[0]), work_dir)
    children = [redis]
    try:
        worker = _child("celery", [sys.executable, "-m", "celery", "-A", "bench.peer_apps:celery_app", "worker",
                                   "--pool", "prefork", "--concurrency", "2", "--loglevel", "WARNING",
                                   "--without-gossip", "--without-mingle", "--without-heartbeat"], work_dir, env)
        children.append(worker)
        celery_echo.delay({"i": -1}).get(timeout=60)  # the worker is up
        [r.get(timeout=60) for r in [celery_echo.delay({"i": i}) for i in range(WARMUP_JOBS)]]
        meter = CpuMeter({"redis-server": redis.process.pid, "celery worker": worker.process.pid})  # type: ignore[union-attr]
        meter.start()
        start = time.perf_counter()
        results = [celery_echo.delay({"i": i}) for i in range(jobs)]
        for i, result in enumerate(results):
            assert result.get(timeout=120) == {"i": i}
        run.jobs_per_s = jobs / (time.perf_counter() - start)
        run.cpu_ms_per_job = meter.per_job_ms(jobs)
        for i in range(single):
            start = time.perf_counter()
            assert celery_echo.delay({"i": i}).get(timeout=60) == {"i": i}
            run.single_ms.append((time.perf_counter() - start) * 1000)
    finally:
        celery_app.close()
        _stop(children)
    return run


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server on PATH: `just bench-peers` installs it (apt-get install redis-server)")
    return found


# --- taskiq + JetStream ----------------------------------------------------------------------------------


async def taskiq_run(jobs: int, single: int, concurrency: int, work_dir: Path, env: dict[str, str]) -> Run:
    run = Run("taskiq+JetStream")
    port = int(env[PEER_NATS_URL_ENV].rsplit(":", 1)[1])
    nats = _child("nats-server", [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port),
                                  "-sd", str(work_dir / "nats")], work_dir)
    children = [nats]
    try:
        _wait_port(port, nats)
        redis = _redis(int(env[REDIS_URL_ENV].rsplit(":", 1)[1].split("/")[0]), work_dir)
        children.append(redis)
        await taskiq_broker.startup()  # creates the stream before the workers' consumers bind to it
        worker = _child("taskiq", [sys.executable, "-m", "taskiq", "worker", "bench.peer_apps:taskiq_broker",
                                   "--workers", "2", "--log-level", "WARNING"], work_dir, env)
        children.append(worker)
        try:

            async def submit(i: int) -> object:
                return await taskiq_echo.kiq({"i": i})

            async def collect(task: object) -> None:
                result = await task.wait_result(check_interval=TASKIQ_POLL_S, timeout=120)  # type: ignore[attr-defined]
                assert not result.is_err, result.error

            await _timed(1, 1, submit, collect)  # the workers are up
            await _timed(WARMUP_JOBS, concurrency, submit, collect)
            meter = CpuMeter({"nats-server": nats.process.pid, "redis-server": redis.process.pid,  # type: ignore[union-attr]
                              "taskiq workers": worker.process.pid})  # type: ignore[union-attr]
            meter.start()
            run.jobs_per_s = await _timed(jobs, concurrency, submit, collect)
            run.cpu_ms_per_job = meter.per_job_ms(jobs)
            run.single_ms = await _one_at_a_time(single, submit, collect)
        finally:
            await taskiq_broker.shutdown()
    finally:
        _stop(children)
    return run


# --- The table ---------------------------------------------------------------------------------------------


def report(rounds: list[list[Run]]) -> None:
    for n, runs in enumerate(rounds, 1):
        ours = runs[0]
        table = Table(title=f"round {n}: the same no-op job, burst then one at a time (ratios: {ours.system} ÷ each)")
        for column in ("system", "jobs/s", "throughput ratio", "p50 ms (one at a time)", "p95 ms",
                       "p50 ratio", "CPU ms/job (all processes)"):
            table.add_column(column)
        for run in runs:
            table.add_row(
                run.system, f"{run.jobs_per_s:,.0f}", f"{ours.jobs_per_s / run.jobs_per_s:.2f}x",
                f"{run.p50_ms:.1f}", f"{percentile(run.single_ms, 95):.1f}", f"{ours.p50_ms / run.p50_ms:.2f}x",
                f"{run.total_cpu_ms:.2f}",
            )
        console.print(table)
        cpu = Table(title=f"round {n}: CPU ms per job of the burst, per process")
        cpu.add_column("system")
        cpu.add_column("process: ms/job")
        for run in runs:
            cpu.add_row(run.system, ", ".join(f"{name} {ms:.2f}" for name, ms in run.cpu_ms_per_job.items()))
        console.print(cpu)
    hops = [runs[0].hops_ms for runs in rounds if runs[0].hops_ms]
    if hops:
        table = Table(title=f"{rounds[0][0].system}, one job at a time: median ms of each hop")
        table.add_column("hop")
        for n in range(len(hops)):
            table.add_column(f"round {n + 1}")
        for hop in HOPS:
            table.add_row(hop, *(f"{h.get(hop, float('nan')):.2f}" for h in hops))
        console.print(table)
    if len(rounds) > 1:
        spread = Table(title=f"spread over {len(rounds)} rounds (min - max)")
        for column in ("peer", "throughput ratio", "p50 ratio"):
            spread.add_column(column)
        for i in range(1, len(rounds[0])):
            throughput = [runs[0].jobs_per_s / runs[i].jobs_per_s for runs in rounds]
            p50 = [runs[0].p50_ms / runs[i].p50_ms for runs in rounds]
            spread.add_row(rounds[0][i].system, f"{min(throughput):.2f}x - {max(throughput):.2f}x "
                           f"(median {statistics.median(throughput):.2f}x)",
                           f"{min(p50):.2f}x - {max(p50):.2f}x (median {statistics.median(p50):.2f}x)")
        console.print(spread)


SYSTEMS = ("gpu-fabric", "celery", "taskiq")


async def bench(jobs: int, single: int, concurrency: int, rounds: int, profile_dir: Path | None,
                systems: tuple[str, ...]) -> None:
    env = {REDIS_URL_ENV: f"redis://127.0.0.1:{free_port()}/0", PEER_NATS_URL_ENV: f"nats://127.0.0.1:{free_port()}"}
    configure(env[REDIS_URL_ENV], env[PEER_NATS_URL_ENV])
    results: list[list[Run]] = []
    for n in range(rounds):
        runs = []
        with tempfile.TemporaryDirectory() as work:
            work_dir = Path(work)
            if "gpu-fabric" in systems:
                runs.append(await platform_run(jobs, single, concurrency, profile_dir if n == 0 else None))
            if "celery" in systems:
                (work_dir / "celery").mkdir()
                runs.append(celery_run(jobs, single, work_dir / "celery", env))  # blocking: nothing else runs
            if "taskiq" in systems:
                (work_dir / "taskiq").mkdir()
                runs.append(await taskiq_run(jobs, single, concurrency, work_dir / "taskiq", env))
        results.append(runs)
        console.print(f"round {n + 1}/{rounds} done")
    report(results)


@app.default
def main(
    *,
    jobs: Annotated[int, Parameter(help="jobs in each burst")] = 2000,
    single: Annotated[int, Parameter(help="jobs run one at a time after the burst")] = 200,
    concurrency: Annotated[int, Parameter(help="submissions outstanding at once in a burst")] = 64,
    rounds: Annotated[int, Parameter(help="times the three systems run back to back (the spread is shown)")] = 1,
    profile_dir: Annotated[Path | None, Parameter(help="py-spy profiles of the platform's processes (first round)")] = None,
    systems: Annotated[tuple[str, ...], Parameter(help=f"which of {', '.join(SYSTEMS)} to run (the first is the reference)")] = SYSTEMS,
) -> None:
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    asyncio.run(bench(jobs, single, concurrency, rounds, profile_dir, systems))


if __name__ == "__main__":
    app()
