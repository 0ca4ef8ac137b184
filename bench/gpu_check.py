"""The CUDA path end to end, in under five minutes, offline: `just gpu-check`.

Every model is built on the spot with random weights (nothing is downloaded): a Qwen2-0.5B-shaped LLM
with a chat template and a Stable-Diffusion-XL-shaped pipeline with `EulerDiscreteScheduler`. One table,
one row per check; the exit status is non-zero when a check fails.

Without a CUDA GPU it runs in dry mode: the checks the CPU can run use toy models of the same
structure, and the GPU-only checks are skipped, each saying so.

    python -m bench.gpu_check            # on an NVIDIA machine
    python -m bench.gpu_check --dry      # the CPU checks only, even where a GPU is present
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import PIL.Image
import torch
from rich.table import Table

from bench.cli import bench_app
from bench.llm_batching import measure, percentile
from sdk.api import ModelSettings
from tests.tiny_models import build_qwen2_shaped, sdxl_shaped_pipeline
from worker.engines.base import EngineError, JobContext, ModelSpec
from worker.engines.image import ImageEngine, prepare
from worker.engines.llm import LLMEngine
from worker.engines.running import InFlight, run_in_thread
from worker.models import MemoryProbe, ModelCache
from worker.telemetry import gpu_snapshot

app, console = bench_app("gpu-check", __doc__)


class Skip(Exception):
    """A check that cannot run here, with the reason."""


@dataclass
class Check:
    name: str
    run: Callable[[Env], Awaitable[str]]
    gpu_only: bool = False


@dataclass
class Env:
    gpu: bool
    folder: Path
    llm_path: Path | None = None

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"

    def llm(self) -> Path:
        if self.llm_path is None:
            self.llm_path = build_qwen2_shaped(self.folder / "qwen2", full=self.gpu)
        return self.llm_path


def allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


# --- The checks ------------------------------------------------------------------------------------


async def load_in(env: Env, dtype: str) -> str:
    engine = LLMEngine()
    loaded = engine.load_model(ModelSpec(name=str(env.llm()), settings=ModelSettings(dtype=dtype)))  # type: ignore[arg-type]
    try:
        placed = {(p.device.type, p.dtype) for p in loaded.model.parameters()}
        expected = {("cuda", getattr(torch, dtype))}
        assert placed == expected, f"parameters are {placed}, expected {expected}"
        return f"{sum(p.numel() for p in loaded.model.parameters()) / 1e6:.0f}M parameters, all cuda {dtype}"
    finally:
        engine.unload_model(loaded)


async def bf16(env: Env) -> str:
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        raise Skip("this GPU only emulates bfloat16 (the engines pick float16 here)")
    return await load_in(env, "bfloat16")


async def fp16(env: Env) -> str:
    return await load_in(env, "float16")


async def chat(env: Env) -> str:
    engine = LLMEngine()
    loaded = engine.load_model(ModelSpec(name=str(env.llm())))
    try:
        params = {"messages": [{"role": "user", "content": "Hello world"}], "max_new_tokens": 8, "temperature": 0}
        result = await engine.inference(loaded, JobContext("chat", 1, params))
        rendered = loaded.tokenizer.apply_chat_template(params["messages"], add_generation_prompt=True, return_dict=True)["input_ids"]
        assert result["prompt_tokens"] == len(rendered), (result["prompt_tokens"], len(rendered))
        assert result["completion_tokens"] >= 1
        return f"{result['prompt_tokens']} prompt tokens through the template, {result['completion_tokens']} generated"
    finally:
        engine.unload_model(loaded)


async def estimate(env: Env) -> str:
    engine = LLMEngine()
    spec = ModelSpec(name=str(env.llm()), settings=ModelSettings(max_batch_tokens=64))
    estimated = engine.memory_required(spec)
    before = allocated()
    loaded = engine.load_model(spec)
    took = allocated() - before
    engine.unload_model(loaded)
    assert took <= estimated <= took * 1.5, f"estimated {estimated} bytes, the load took {took}"
    return f"estimated {estimated / 2**20:.0f} MiB, took {took / 2**20:.0f} MiB ({estimated / took:.2f}x)"


async def nvml_matches_torch(env: Env) -> str:
    import pynvml

    gpus = gpu_snapshot()
    assert gpus, "NVML reports no GPU"
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if not hasattr(props, "pci_bus_id"):
        raise Skip("this torch does not report its device's PCI bus id")
    # NVML writes `00000000:17:00.0`; torch gives the bus and device numbers.
    torch_bus = f"{props.pci_bus_id:02x}:{props.pci_device_id:02x}"
    buses = []
    for gpu in gpus:
        info = pynvml.nvmlDeviceGetPciInfo(pynvml.nvmlDeviceGetHandleByIndex(gpu.index))
        bus = info.busId.decode() if isinstance(info.busId, bytes) else info.busId
        buses.append(bus.lower())
    assert any(bus.rsplit(".", 1)[0].endswith(torch_bus) for bus in buses), f"torch uses {torch_bus}; NVML lists {buses}"
    return f"torch's device is at {torch_bus}, which NVML lists"


async def concurrent_images(env: Env) -> str:
    dtype = torch.float16 if env.gpu else torch.float32
    loaded = prepare(sdxl_shaped_pipeline(full=env.gpu, device=env.device, dtype=dtype), env.device)
    side = 1024 if env.gpu else 64
    params = {"prompt": "a fox", "width": side, "height": side, "steps": 4, "seed": 1}
    stored: dict[str, bytes] = {}

    async def store(name: str, data: bytes, content_type: str) -> str:
        stored[name] = data
        return name

    engine = ImageEngine()
    started = time.perf_counter()
    alone = await engine.inference(loaded, JobContext("alone", 1, params, store_object=store))

    async def cancel_soon(fraction: float, message: str | None = None) -> None:
        doomed.cancelled.set()

    doomed = JobContext("doomed", 1, {**params, "steps": 50}, progress=cancel_soon, store_object=store)
    outcomes = await asyncio.gather(
        engine.inference(loaded, JobContext("a", 1, params, store_object=store)),
        engine.inference(loaded, JobContext("b", 1, params, store_object=store)),
        engine.inference(loaded, doomed),
        return_exceptions=True,
    )
    errors = [o for o in outcomes[:2] if isinstance(o, BaseException)]
    assert not errors, f"concurrent jobs failed: {errors}"
    assert isinstance(outcomes[2], EngineError) and outcomes[2].code == "cancelled", outcomes[2]
    reference = pixels(stored[alone["images"][0]["object"]])
    for outcome in outcomes[:2]:
        difference = numpy.abs(pixels(stored[outcome["images"][0]["object"]]) - reference).mean()  # type: ignore[index]
        assert difference < 1.0, f"a picture differs from the one made alone (mean {difference:.1f} levels)"
    return f"2 jobs side by side + 1 cancelled, {side}px, {time.perf_counter() - started:.1f}s"


def pixels(png: bytes) -> numpy.ndarray:
    return numpy.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"), dtype=numpy.float32)


async def unload_returns_memory(env: Env) -> str:
    engine = LLMEngine()
    baseline = allocated()
    loaded = engine.load_model(ModelSpec(name=str(env.llm())))
    await engine.inference(loaded, JobContext("warm", 1, {"prompt": "Hello", "max_new_tokens": 8}))
    engine.unload_model(loaded)
    del loaded
    left = allocated() - baseline
    assert left < 16 * 2**20, f"{left} bytes still allocated after unload"
    return f"{left / 2**20:.1f} MiB above the baseline after unload"


async def lru_eviction(env: Env) -> str:
    engine = LLMEngine()
    first = ModelSpec(name=str(env.llm()))
    size = engine.memory_required(first)
    second = ModelSpec(name=str(env.llm()), settings=ModelSettings(dtype="float32" if not env.gpu else "float16"))
    cache = ModelCache(MemoryProbe(on_gpu=env.gpu), limit_bytes=int(max(size, engine.memory_required(second)) * 1.5))
    async with cache.use(engine, first):
        pass
    async with cache.use(engine, second):
        pass
    names = [(m.model, m.memory_bytes) for m in cache.loaded()]
    await cache.clear()
    assert len(names) == 1, f"both stayed loaded: {names}"
    return "the least recently used model made room for the next"


async def forced_oom(env: Env) -> str:
    engine = LLMEngine()
    loaded = engine.load_model(ModelSpec(name=str(env.llm())))
    try:
        baseline = allocated()

        def hog(send: Any, halt: Any) -> None:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.empty(total * 2, dtype=torch.uint8, device="cuda")

        try:
            await run_in_thread(hog, lambda item: asyncio.sleep(0), asyncio.Event(), InFlight())
        except EngineError as exc:
            assert exc.code == "gpu_out_of_memory", exc.code
        else:
            raise AssertionError("allocating twice the GPU did not fail")
        assert allocated() <= baseline, "the failed allocation left memory behind"
        result = await engine.inference(loaded, JobContext("after", 1, {"prompt": "Hello", "max_new_tokens": 4}))
        assert result["completion_tokens"] >= 1
        return "gpu_out_of_memory, memory back to the baseline, the next job ran"
    finally:
        engine.unload_model(loaded)


async def nvml_heartbeat(env: Env) -> str:
    gpu = gpu_snapshot()[0]
    missing = [f for f in ("utilization_pct", "temperature_c", "power_w") if getattr(gpu, f) is None]
    assert gpu.memory_total_bytes > 0 and not missing, f"missing: {missing}"
    return (
        f"{gpu.name}: {gpu.memory_used_bytes / 2**30:.1f}/{gpu.memory_total_bytes / 2**30:.0f} GiB, "
        f"{gpu.utilization_pct:.0f}%, {gpu.temperature_c:.0f}C, {gpu.power_w:.0f} W"
    )


async def batching(env: Env) -> str:
    shape = "medium" if env.gpu else "tiny"
    runs = await measure(shape, jobs=16, max_new_tokens=32 if env.gpu else 16)
    batched, single = runs["batched"], runs["one at a time"]
    speedup = batched.tokens_per_s / single.tokens_per_s
    itl = percentile(batched.gaps_ms, 95) / percentile(single.gaps_ms, 95)
    detail = f"{shape}: {batched.tokens_per_s:.0f} vs {single.tokens_per_s:.0f} tokens/s ({speedup:.2f}x), inter-token p95 {itl:.2f}x"
    # On a GPU the targets hold; on a shared CPU (compute-bound at 16 rows) batching must at least not lose.
    assert speedup >= (3.0 if env.gpu else 1.0), f"batched gives {speedup:.2f}x the tokens/s of one at a time"
    assert itl < 2.0 or not env.gpu, f"the inter-token p95 is {itl:.2f}x a single job's: {detail}"
    return detail


async def gpu_index_out_of_range(env: Env) -> str:
    # CUDA reads CUDA_VISIBLE_DEVICES once, at its start: the refusal needs a process of its own.
    listed = len(gpu_snapshot())
    code = f"from worker.models import MemoryProbe, ModelCache; ModelCache(MemoryProbe([{listed}]))"
    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": str(listed), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    process = subprocess.run([sys.executable, "-c", code], env=hidden, capture_output=True, text=True, timeout=120)
    assert process.returncode != 0 and "torch sees none of them" in process.stderr, process.stderr[-400:]
    return f"gpus [{listed}] with {listed} GPU(s) listed: refused at start, not run on the CPU"


CHECKS = [
    Check("load in bfloat16 on the GPU", bf16, gpu_only=True),
    Check("load in float16 on the GPU", fp16, gpu_only=True),
    Check("Qwen2-shaped LLM with a chat template", chat),
    Check("memory estimate vs what the load took", estimate, gpu_only=True),
    Check("NVML's device is torch's (PCI bus id)", nvml_matches_torch, gpu_only=True),
    Check("SDXL-shaped, Euler: 2 concurrent jobs and a cancel", concurrent_images),
    Check("unload returns memory to the baseline", unload_returns_memory, gpu_only=True),
    Check("LRU eviction", lru_eviction),
    Check("forced out-of-memory leaves the worker healthy", forced_oom, gpu_only=True),
    Check("NVML readings for heartbeats", nvml_heartbeat, gpu_only=True),
    Check("an out-of-range GPU index is refused", gpu_index_out_of_range, gpu_only=True),
    Check("continuous batching, 16 jobs", batching),
]


async def run_checks(gpu: bool) -> list[tuple[str, str, str, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        env = Env(gpu=gpu, folder=Path(folder))
        for check in CHECKS:
            started = time.perf_counter()
            if check.gpu_only and not gpu:
                rows.append((check.name, "SKIP", "needs an NVIDIA GPU (dry mode)", 0.0))
                continue
            try:
                status, detail = "PASS", await check.run(env)
            except Skip as exc:
                status, detail = "SKIP", str(exc)
            except Exception as exc:
                status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            rows.append((check.name, status, detail, time.perf_counter() - started))
    return rows


@app.default
def main(dry: bool = False) -> None:
    """Run every check and print one table; exit 1 when one failed."""
    gpu = torch.cuda.is_available() and not dry
    if not gpu:
        console.print("[yellow]dry mode: no CUDA GPU in use, GPU-only checks are skipped[/yellow]")
    rows = asyncio.run(run_checks(gpu))
    device = torch.cuda.get_device_name() if gpu else "CPU (dry mode)"
    table = Table(title=f"gpu-check on {device}")
    for column in ("check", "result", "detail", "s"):
        table.add_column(column)
    colour = {"PASS": "green", "FAIL": "red", "SKIP": "yellow"}
    for name, status, detail, seconds in rows:
        table.add_row(name, f"[{colour[status]}]{status}[/]", detail, f"{seconds:.1f}")
    console.print(table)
    sys.exit(1 if any(status == "FAIL" for _, status, _, _ in rows) else 0)


if __name__ == "__main__":
    app()
