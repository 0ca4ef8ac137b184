"""What the platform adds to an LLM job: the same generate call made directly (LLMEngine on a loaded
model, in this process) and through the platform (SDK -> gateway -> scheduler -> worker -> SDK).

    python -m bench.llm_overhead --runs 20 --max-new-tokens 32

The model is a small random-weight GPT-2 built offline (no download), warm on both sides; the
difference of the medians is the platform's overhead, in ms and as a share of the job's time. The two
paths alternate run by run, and the platform's runs are broken into hops from the log's timestamps.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.cli import bench_app, figures
from bench.hops import HOPS, job_hops
from sdk.client import Client
from sdk.local import LocalStack
from tests.tiny_models import build_tiny_gpt2
from worker.engines.base import JobContext, ModelSpec
from worker.engines.llm import LLMEngine

app, console = bench_app("bench-llm", __doc__)


async def bench(runs: int, max_new_tokens: int) -> None:
    """Direct calls and platform jobs alternate, one each per round, so the machine's other load falls on
    both alike (on a shared machine a run of one then a run of the other measures the load, not us)."""
    params: dict[str, object] = {"prompt": "The platform measures", "max_new_tokens": max_new_tokens, "seed": 1}
    alone: list[float] = []
    platform: list[float] = []
    #: Each platform job's time less its engine's own time (from its result, measured in the worker).
    around: list[float] = []
    ended: list[tuple[str, int, int]] = []
    with tempfile.TemporaryDirectory() as models, tempfile.TemporaryDirectory() as data_dir:
        model_path = build_tiny_gpt2(Path(models) / "gpt2")
        engine = LLMEngine()
        loaded = engine.load_model(ModelSpec(name=str(model_path)))
        stack = LocalStack(Path(data_dir))
        stack.start()
        try:
            stack.start_worker("bench", "local", "--engines", "llm")
            client = await Client.connect(stack.nats_url, api_key=stack.operator_key)
            while not [w for w in await client.workers() if w.status == "online"]:
                await asyncio.sleep(0.2)
            for i in range(runs + 1):  # the first round warms caches and loads the worker's model
                start = time.perf_counter()
                await engine.inference(loaded, JobContext(f"direct-{i}", 1, params))
                direct_ms = (time.perf_counter() - start) * 1000
                start, start_ns = time.perf_counter(), time.time_ns()
                job = await client.submit("llm", model=str(model_path), params=params)
                done = await client.wait(job.id, timeout_s=120)
                assert done.status == "completed", done.error
                if i:
                    alone.append(direct_ms)
                    platform.append((time.perf_counter() - start) * 1000)
                    result = done.result
                    around.append(platform[-1] - 1000 * result["completion_tokens"] / result["tokens_per_s"])
                    ended.append((job.id, start_ns, time.time_ns()))
            await client.close()
            hops = await job_hops(stack.nats_url, ended)
        finally:
            stack.stop()
    direct_ms, platform_ms = statistics.median(alone), statistics.median(platform)
    overhead_ms = platform_ms - direct_ms
    p95 = int(0.95 * (runs - 1))
    rows = [
        ("generate, called directly", f"{direct_ms:.1f}", f"{sorted(alone)[p95]:.1f}"),
        ("through the platform", f"{platform_ms:.1f}", f"{sorted(platform)[p95]:.1f}"),
        ("platform overhead (difference of the medians)", f"{overhead_ms:.1f}",
         f"{overhead_ms / platform_ms:.0%} of the job"),
        ("platform job less its own engine time (same job)", f"{statistics.median(around):.1f}",
         f"{statistics.median(around) / platform_ms:.0%} of the job"),
    ]
    title = f"LLM job, {max_new_tokens} new tokens, median of {runs} warm runs (alternating)"
    console.print(figures(title, ("path", "median ms", "p95 ms"), rows, justify="left"))
    console.print(figures(
        "through the platform, median ms of each hop (the engine runs inside started -> completed)",
        ("hop", "median ms"), ((hop, f"{hops.get(hop, float('nan')):.2f}") for hop in HOPS), justify="left",
    ))


@app.default
def main(*, runs: int = 20, max_new_tokens: int = 32) -> None:
    asyncio.run(bench(runs, max_new_tokens))


if __name__ == "__main__":
    app()
