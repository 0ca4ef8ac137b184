"""Continuous batching in the LLM engine: N concurrent jobs on one warm model, batched vs one at a time.

    python -m bench.llm_batching --jobs 16 --max-new-tokens 32 --shape tiny --rounds 5
    python -m bench.llm_batching --jobs 16 --max-new-tokens 16 --shape medium   # ~300M parameters

Models are random-weight GPT-2s built offline (no download): `tiny` is the tests' 2-layer model,
`medium` has GPT-2 medium's shape (24 layers of 1024, about 300M parameters) over the tests' small
vocabulary. Greedy decoding, the same prompts both ways; one at a time is `max_batch_size` 1, so both
runs take the same code path. Figures: tokens/s over the whole run, time to first token and the gap
between streamed chunks (inter-token latency) per job, p50/p95. The two modes alternate for `rounds`
rounds and each pools its rounds, so a machine whose load changes during the run weighs on both alike.

The last row is the floor batching cannot go below: the model's own forward pass (transformers alone,
no engine) decoding one token for `jobs` rows against one row. Where it is over 2x (a CPU, compute-bound
at 16 rows) the inter-token target cannot be met by scheduling; the engine's own cost is the rest.
"""

from __future__ import annotations

import asyncio
import inspect
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerFast

from bench.cli import bench_app
from sdk.api import ModelSettings
from tests.tiny_models import SENTENCES, build_tiny_gpt2
from worker.engines.base import JobContext, ModelSpec
from worker.engines.llm import LLMEngine, LoadedLLM

app, console = bench_app("bench-llm-batching", __doc__)


@dataclass
class Run:
    wall_s: float
    tokens: int
    first_token_ms: list[float] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    #: Only for the bare forward pass: its step times at one row.
    single_ms: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else float("nan")

    def add(self, other: Run) -> None:
        self.wall_s += other.wall_s
        self.tokens += other.tokens
        self.first_token_ms += other.first_token_ms
        self.gaps_ms += other.gaps_ms


def build_model(path: Path, shape: str) -> Path:
    build_tiny_gpt2(path)
    if shape == "medium":
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=1024, n_embd=1024, n_layer=24, n_head=16,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(path)
    return path


async def run_jobs(engine: LLMEngine, loaded: LoadedLLM, prompts: list[str], max_new_tokens: int) -> Run:
    started = time.perf_counter()
    run = Run(wall_s=0.0, tokens=0)

    async def job(index: int, prompt: str) -> None:
        stamps: list[float] = []

        async def emit(chunk: str) -> None:
            stamps.append(time.perf_counter())

        params = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0}
        result = await engine.inference(loaded, JobContext(f"bench-{index}", 1, params, emit=emit))
        run.tokens += result["completion_tokens"]
        if result["time_to_first_token_ms"] is not None:
            run.first_token_ms.append(result["time_to_first_token_ms"])
        run.gaps_ms += [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]

    await asyncio.gather(*(job(i, p) for i, p in enumerate(prompts)))
    run.wall_s = time.perf_counter() - started
    return run


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def measure(shape: str, jobs: int, max_new_tokens: int, rounds: int = 1) -> dict[str, Run]:
    with tempfile.TemporaryDirectory() as folder:
        path = build_model(Path(folder) / shape, shape)
        engine = LLMEngine()
        loaded = engine.load_model(ModelSpec(name=str(path)))
        prompts = [SENTENCES[i % len(SENTENCES)][: 8 + 5 * (i % 7)] for i in range(jobs)]
        await run_jobs(engine, loaded, prompts[:2], 4)  # warm-up
        runs = {"one at a time": Run(wall_s=0.0, tokens=0), "batched": Run(wall_s=0.0, tokens=0)}
        for _ in range(rounds):
            for name, batch in (("one at a time", 1), ("batched", jobs)):
                engine.configure(loaded, ModelSettings(max_batch_size=batch))
                runs[name].add(await run_jobs(engine, loaded, prompts, max_new_tokens))
        assert loaded.model is not None
        runs["forward alone, 16 rows / 1 row"] = forward_ratio(loaded.model, jobs, rounds)
        engine.unload_model(loaded)
        return runs


def forward_ratio(model: PreTrainedModel, rows: int, rounds: int) -> Run:
    """Decode steps of the bare model (a 48-token cache) at `rows` rows and at one, alternating; the
    result's `gaps_ms` are the step times at `rows`, `single_ms` those at one."""
    run = Run(wall_s=0.0, tokens=0)
    device = model.device
    # transformers 5 renamed `past_key_values` to `cache` (as the engine's decode loop knows).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        for _ in range(rounds * 4):
            for width, into in ((1, run.single_ms), (rows, run.gaps_ms)):
                out = model(input_ids=torch.ones((width, 48), dtype=torch.long, device=device), use_cache=True)
                step = torch.ones((width, 1), dtype=torch.long, device=device)
                for _ in range(4):
                    started = time.perf_counter()
                    out = model(input_ids=step, use_cache=True, **{cache_arg: out.past_key_values})
                    into.append((time.perf_counter() - started) * 1000)
    return run


@app.default
def main(jobs: int = 16, max_new_tokens: int = 32, shape: str = "tiny", rounds: int = 3) -> None:
    """Run the benchmark and print one table."""
    runs = asyncio.run(measure(shape, jobs, max_new_tokens, rounds))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    title = f"{jobs} concurrent greedy jobs, {max_new_tokens} new tokens each, {shape} model, {device}, {rounds} rounds"
    table = Table(title=title)
    for column in ("mode", "tokens/s", "TTFT p50 / p95 (ms)", "inter-token p50 / p95 (ms)", "wall (s)"):
        table.add_column(column)
    for name, run in runs.items():
        if run.single_ms:
            ratio = percentile(run.gaps_ms, 50) / percentile(run.single_ms, 50)
            step = f"{percentile(run.gaps_ms, 50):.1f} vs {percentile(run.single_ms, 50):.1f} ({ratio:.2f}x)"
            table.add_row(name, "", "", step, "")
            continue
        table.add_row(
            name,
            f"{run.tokens_per_s:.0f}",
            f"{percentile(run.first_token_ms, 50):.0f} / {percentile(run.first_token_ms, 95):.0f}",
            f"{percentile(run.gaps_ms, 50):.1f} / {percentile(run.gaps_ms, 95):.1f}",
            f"{run.wall_s:.1f}",
        )
    console.print(table)
    speedup = runs["batched"].tokens_per_s / runs["one at a time"].tokens_per_s
    itl = percentile(runs["batched"].gaps_ms, 95) / percentile(runs["one at a time"].gaps_ms, 95)
    console.print(f"batched / one at a time: {speedup:.2f}x tokens/s, inter-token p95 {itl:.2f}x")


if __name__ == "__main__":
    app()
