"""What the platform adds to an LLM job: the same generate call made directly (LLMEngine on a loaded
model, in this process) and through the platform (SDK -> gateway -> scheduler -> worker -> SDK).

    python -m bench.llm_overhead --runs 20 --max-new-tokens 32

The model is a small random-weight GPT-2 built offline (no download), warm on both sides; the
difference of the medians is the platform's overhead, in ms and as a share of the job's time.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from cyclopts import App
from rich.console import Console
from rich.table import Table

from sdk.client import Client
from sdk.http import HttpClient
from sdk.local import LocalStack
from tests.tiny_models import build_tiny_gpt2
from worker.engines.base import JobContext, ModelSpec
from worker.engines.llm import LLMEngine

app = App(name="bench-llm", help=__doc__)
console = Console()


async def direct(model_path: Path, params: dict[str, object], runs: int) -> list[float]:
    engine = LLMEngine()
    loaded = engine.load_model(ModelSpec(name=str(model_path)))
    timings_ms = []
    for i in range(runs + 1):
        start = time.perf_counter()
        await engine.inference(loaded, JobContext(f"direct-{i}", 1, params))
        if i:  # the first call warms caches, as the platform's warm-up job does
            timings_ms.append((time.perf_counter() - start) * 1000)
    return timings_ms


async def through_platform(model_path: Path, params: dict[str, object], runs: int) -> list[float]:
    with tempfile.TemporaryDirectory() as data_dir:
        stack = LocalStack(Path(data_dir))
        stack.start()
        try:
            async with HttpClient(stack.http_url) as http:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if (await http.health())["status"] == "ok":
                            break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                    await asyncio.sleep(0.1)
            stack.start_worker("bench", "local", "--engines", "llm")
            client = await Client.connect(stack.nats_url, api_key=stack.operator_key)
            while not [w for w in await client.workers() if w.status == "online"]:
                await asyncio.sleep(0.2)
            timings_ms = []
            for i in range(runs + 1):
                start = time.perf_counter()
                job = await client.submit("llm", model=str(model_path), params=params)
                done = await client.wait(job.id, timeout_s=120)
                assert done.status == "completed", done.error
                if i:  # the first job loads the model
                    timings_ms.append((time.perf_counter() - start) * 1000)
            await client.close()
            return timings_ms
        finally:
            stack.stop()


async def bench(runs: int, max_new_tokens: int) -> None:
    params: dict[str, object] = {"prompt": "The platform measures", "max_new_tokens": max_new_tokens, "seed": 1}
    with tempfile.TemporaryDirectory() as models:
        model_path = build_tiny_gpt2(Path(models) / "gpt2")
        alone = await direct(model_path, params, runs)
        platform = await through_platform(model_path, params, runs)
    direct_ms, platform_ms = statistics.median(alone), statistics.median(platform)
    overhead_ms = platform_ms - direct_ms
    table = Table(title=f"LLM job, {max_new_tokens} new tokens, median of {runs} warm runs")
    for column in ("path", "median ms", "p95 ms"):
        table.add_column(column)
    table.add_row("generate, called directly", f"{direct_ms:.1f}", f"{sorted(alone)[int(0.95 * (runs - 1))]:.1f}")
    table.add_row("through the platform", f"{platform_ms:.1f}", f"{sorted(platform)[int(0.95 * (runs - 1))]:.1f}")
    table.add_row("platform overhead", f"{overhead_ms:.1f}", f"{overhead_ms / platform_ms:.0%} of the job")
    console.print(table)


@app.default
def main(*, runs: int = 20, max_new_tokens: int = 32) -> None:
    asyncio.run(bench(runs, max_new_tokens))


if __name__ == "__main__":
    app()
