"""Direct mode's round trip next to a scheduled job's and a raw NATS request-reply's, in one run, on one
server (docs/benchmarks.md, "Direct mode").

    python -m bench.direct --requests 1000

Starts a local platform with one echo worker, then measures, one request at a time:
- raw NATS request-reply: a nats-py responder in a process of its own that answers each request with
  its body (the floor: two hops through the server, no platform code);
- a direct echo request: `session.run(params)` straight to the worker (token checked, engine run);
- the same through the gateway's HTTP relay (`POST /api/v1/direct/sessions/{id}/run`);
- a scheduled echo job: `submit` + `wait` (gateway, log, scheduler, dispatch, reports).
The first two take turns request by request (so a moment of load weighs on both alike). Prints p50 / p99 of each and the ratio of direct to raw (the target is 2x at most).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import httpx
from cyclopts import Parameter
from nats.aio.msg import Msg
from rich.table import Table

from bench.cli import bench_app
from bench.echo_throughput import echo_stack, percentile
from sdk.client import Client
from sdk.connection import connect
from sdk.http import HttpClient
from sdk.local import LocalStack

app, console = bench_app("bench-direct", __doc__)
RAW_SUBJECT = "bench.direct.raw"
PARAMS = {"prompt": "hello", "n": 1}


@app.command
def responder(url: str) -> None:
    """The raw baseline's responder (run by the benchmark in a process of its own)."""

    async def serve() -> None:
        nc = await connect(url, name="bench-responder")

        async def answer(msg: Msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(RAW_SUBJECT, cb=answer)
        await nc.flush()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


async def timed(count: int, calls: dict[str, Callable[[], Awaitable[object]]]) -> dict[str, list[float]]:
    """Round trips of each call, one at a time, in ms, after a warm-up of a tenth as many. The calls take
    turns, so a machine that is busier at one moment weighs on every path alike (this one is shared)."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(max(10, count // 10) + count):
        for name, call in calls.items():
            start = time.perf_counter()
            await call()
            if i >= max(10, count // 10):
                out[name].append((time.perf_counter() - start) * 1000)
    return out


async def bench(count: int, jobs: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as data_dir:
        async with echo_stack(Path(data_dir), workers=1, worker_concurrency=4) as (stack, _):
            async with HttpClient(stack.http_url, api_key=stack.operator_key) as operator:
                api_key = (await operator.create_api_key("bench-direct")).api_key
            raw_process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.direct", "responder", stack.nats_url, stdout=asyncio.subprocess.PIPE
            )
            try:
                assert raw_process.stdout is not None
                await raw_process.stdout.readline()
                return await measure(stack, api_key, count, jobs)
            finally:
                raw_process.kill()
                await raw_process.wait()


async def measure(stack: LocalStack, api_key: str, count: int, jobs: int) -> dict[str, list[float]]:
    raw_nc = await connect(stack.nats_url, name="bench-raw")
    payload = b'{"prompt":"hello","n":1}'
    async with await Client.connect(stack.client_url, api_key=api_key) as client:
        async with client.direct("echo", ttl_s=3600) as session:
            async with HttpClient(stack.http_url, api_key=api_key) as http:
                token = (await http.auth.headers())["Authorization"]
            async with httpx.AsyncClient(base_url=stack.http_url, headers={"Authorization": token}) as raw_http:
                relay = f"/api/v1/direct/sessions/{session.view.session_id}/run"
                results = await timed(count, {
                    "raw NATS request-reply": lambda: raw_nc.request(RAW_SUBJECT, payload, timeout=5),
                    "direct echo request (NATS)": lambda: session.run(PARAMS),
                })
                results |= await timed(count, {
                    "direct echo request (HTTP relay)": lambda: raw_http.post(relay, json={"params": PARAMS}),
                })
        await raw_nc.close()

        async def job() -> None:
            submitted = await client.submit("echo", params=PARAMS)
            done = await client.wait(submitted.id, timeout_s=60)
            assert done.status == "completed", done

        results |= await timed(jobs, {"scheduled echo job (submit + wait)": job})
    return results


@app.default
def main(
    *,
    requests: Annotated[int, Parameter(help="round trips per direct and raw measure")] = 1000,
    jobs: Annotated[int, Parameter(help="scheduled jobs measured")] = 300,
) -> None:
    results = asyncio.run(bench(requests, jobs))
    table = Table(title="round trips, one at a time (ms)")
    for column in ("path", "n", "p50", "p99", "p50 ÷ raw p50"):
        table.add_column(column)
    raw_p50 = percentile(results["raw NATS request-reply"], 50)
    for name, samples in results.items():
        p50 = percentile(samples, 50)
        table.add_row(name, str(len(samples)), f"{p50:.2f}", f"{percentile(samples, 99):.2f}", f"{p50 / raw_p50:.1f}x")
    console.print(table)


if __name__ == "__main__":
    app()
