"""The model cache: one load per model, room made by LRU eviction, memory checked before loading."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from sdk.errors import InsufficientGpuMemory
from tests.tiny_models import build_tiny_gpt2
from worker.config import ConfigError
from worker.engines.base import BaseEngine, EngineError, JobContext, ModelSpec
from worker.engines.llm import LLMEngine
from worker.models import (
    Evict,
    LoadStage,
    MemoryProbe,
    ModelCache,
    NoRoom,
    Resident,
    WaitForRelease,
    make_room,
)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2")


class SizedEngine(BaseEngine):
    """An engine whose models are names with a size (`big:5000`), loaded instantly, counted."""

    job_type = "sized"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.memory_releases = 0
        #: Loads wait for this, so a test can hold one mid-load.
        self.may_load = threading.Event()
        self.may_load.set()

    def memory_required(self, spec: ModelSpec) -> int:
        return int(spec.name.split(":")[1])

    def load_model(self, spec: ModelSpec) -> Any:
        self.started.append(spec.name)
        self.may_load.wait(timeout=10)
        if spec.name.startswith("broken"):
            raise RuntimeError("the weights are corrupt")
        self.loads.append(spec.name)
        return {"model": spec.name}

    def release_memory(self) -> None:
        self.memory_releases += 1

    def unload_model(self, model: Any) -> None:
        self.unloads.append(model["model"])

    async def inference(self, model: Any, ctx: JobContext) -> Any:
        return model


class Reports:
    """What the runtime would turn into WorkerModelLoaded/Unloaded reports."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, int]] = []
        self.unloaded: list[str] = []
        self.stages: list[tuple[str, LoadStage]] = []

    async def on_loaded(self, model: str, memory_bytes: int) -> None:
        self.loaded.append((model, memory_bytes))

    async def on_unloaded(self, model: str) -> None:
        self.unloaded.append(model)

    def on_progress(self, model: str, stage: LoadStage) -> None:
        self.stages.append((model, stage))


def cache_with(reports: Reports, limit_bytes: int) -> ModelCache:
    return ModelCache(
        MemoryProbe(on_gpu=False),
        limit_bytes=limit_bytes,
        on_loaded=reports.on_loaded,
        on_unloaded=reports.on_unloaded,
        on_load_progress=reports.on_progress,
    )


def spec(name: str) -> ModelSpec:
    return ModelSpec(name=name)


async def test_two_concurrent_uses_share_one_load() -> None:
    engine, reports = SizedEngine(), Reports()
    cache = cache_with(reports, limit_bytes=1000)
    engine.may_load.clear()

    async def job() -> Any:
        async with cache.use(engine, spec("a:100")) as handle:
            return handle

    jobs = asyncio.gather(job(), job())
    await asyncio.sleep(0)  # both jobs are now waiting on the same load
    engine.may_load.set()
    first, second = await jobs

    assert first is second
    assert engine.loads == ["a:100"]
    assert reports.loaded == [("a:100", 100)]
    assert [(m.model, m.memory_bytes) for m in cache.loaded()] == [("a:100", 100)]


async def test_model_larger_than_the_limit_fails_with_the_numbers() -> None:
    engine, reports = SizedEngine(), Reports()
    cache = cache_with(reports, limit_bytes=1000)
    async with cache.use(engine, spec("small:300")):
        pass

    with pytest.raises(InsufficientGpuMemory) as failure:
        await cache.acquire(engine, spec("big:5000"))

    assert failure.value.details == {"required_bytes": 5000, "free_bytes": 1000, "model": "big:5000"}
    # Nothing was evicted for a load that could never fit, and the cache still serves.
    assert engine.unloads == []
    assert [m.model for m in cache.loaded()] == ["small:300"]
    async with cache.use(engine, spec("other:700")) as handle:
        assert handle == {"model": "other:700"}


async def test_least_recently_used_models_are_evicted_first() -> None:
    engine, reports = SizedEngine(), Reports()
    cache = cache_with(reports, limit_bytes=300)
    for name in ("a:100", "b:100", "c:100", "a:100"):
        async with cache.use(engine, spec(name)):
            pass

    async with cache.use(engine, spec("d:100")):
        pass
    async with cache.use(engine, spec("e:200")):
        pass

    assert reports.unloaded == ["b:100", "c:100", "a:100"]
    assert sorted(m.model for m in cache.loaded()) == ["d:100", "e:200"]
    assert engine.loads == ["a:100", "b:100", "c:100", "d:100", "e:200"]


async def test_model_in_use_is_not_evicted_and_the_load_waits_for_it() -> None:
    engine, reports = SizedEngine(), Reports()
    cache = cache_with(reports, limit_bytes=200)
    waiting = asyncio.Event()
    cache.on_load_progress = lambda model, stage: waiting.set() if stage == LoadStage.WAITING_FOR_MEMORY else None

    async with cache.use(engine, spec("a:150")):
        other_job = asyncio.create_task(cache.acquire(engine, spec("b:100")))
        await asyncio.wait_for(waiting.wait(), timeout=5)
        assert reports.unloaded == []
    handle = await asyncio.wait_for(other_job, timeout=5)
    cache.release(engine, spec("b:100"))

    assert handle == {"model": "b:100"}
    assert reports.unloaded == ["a:150"]
    assert [m.model for m in cache.loaded()] == ["b:100"]


async def test_two_models_that_do_not_fit_together_take_turns() -> None:
    engine, reports = SizedEngine(), Reports()
    cache = cache_with(reports, limit_bytes=200)

    async def job(name: str) -> Any:
        async with cache.use(engine, spec(name)) as handle:
            return handle

    handles = await asyncio.wait_for(asyncio.gather(job("a:150"), job("b:150")), timeout=5)

    assert handles == [{"model": "a:150"}, {"model": "b:150"}]
    assert engine.loads == ["a:150", "b:150"]
    assert reports.unloaded == ["a:150"]


async def test_model_that_fails_to_load_leaves_the_cache_healthy(tiny_gpt2: Path) -> None:
    engine, reports = LLMEngine(), Reports()
    cache = cache_with(reports, limit_bytes=10**9)

    for _ in range(2):  # a failure is not cached: the second try loads again, and fails again
        with pytest.raises(EngineError) as failure:
            await cache.acquire(engine, spec("/nonexistent/model"))
        assert failure.value.code == "model_load_failed"
        assert "/nonexistent/model" in failure.value.message

    async with cache.use(engine, spec(str(tiny_gpt2))) as first:
        pass
    async with cache.use(engine, spec(str(tiny_gpt2))) as second:
        pass

    assert first is second
    assert reports.loaded == [(str(tiny_gpt2), engine.memory_required(spec(str(tiny_gpt2))))]
    assert [m.model for m in cache.loaded()] == [str(tiny_gpt2)]
    assert [stage for _, stage in reports.stages] == [
        LoadStage.LOADING, LoadStage.FAILED, LoadStage.LOADING, LoadStage.FAILED, LoadStage.LOADING, LoadStage.LOADED
    ]


async def test_clear_unloads_idle_models() -> None:
    engine, reports = SizedEngine(), Reports()
    cache = cache_with(reports, limit_bytes=1000)
    async with cache.use(engine, spec("a:100")):
        pass

    await cache.clear()

    assert reports.unloaded == ["a:100"]
    assert cache.loaded() == []


def resident(name: str, memory_bytes: int, last_used: int, busy: bool = False) -> Resident:
    return Resident(key=("sized", name, b"{}"), memory_bytes=memory_bytes, last_used=last_used, busy=busy)


@pytest.mark.parametrize(
    ("required", "free", "residents", "decision"),
    [
        (100, 100, [resident("a", 50, 1)], Evict(())),
        (100, 0, [resident("a", 50, 2), resident("b", 50, 1), resident("c", 50, 3)],
         Evict((("sized", "b", b"{}"), ("sized", "a", b"{}")))),
        (100, 0, [resident("a", 50, 1, busy=True), resident("b", 50, 2)], WaitForRelease()),
        (100, 10, [resident("a", 50, 1, busy=True), resident("b", 30, 2)], NoRoom(90)),
    ],
    ids=["fits", "lru-first", "busy-wait", "never-fits"],
)
def test_make_room_decides_which_models_to_evict(
    required: int, free: int, residents: list[Resident], decision: object
) -> None:
    assert make_room(required, free, residents) == decision


def test_memory_probe_reads_host_memory_without_a_gpu() -> None:
    assert MemoryProbe(on_gpu=False).free_bytes() > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
async def test_a_gpu_whose_free_memory_cannot_be_measured_refuses_loads_instead_of_skipping_the_check() -> None:
    engine = SizedEngine()
    cache = ModelCache(MemoryProbe([0], on_gpu=True), limit_bytes=1000)

    with pytest.raises(EngineError) as failure:
        await cache.acquire(engine, spec("a:100"))

    assert failure.value.code == "gpu_unavailable"
    assert engine.started == []


def test_a_model_cache_on_several_gpus_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="one worker per GPU"):
        ModelCache(MemoryProbe([0, 1], on_gpu=True))


def test_gpu_indices_torch_cannot_see_are_refused_at_start_instead_of_running_on_the_cpu() -> None:
    # Here torch sees no CUDA device at all: GPU 3 is out of range, whatever the driver lists.
    assert not torch.cuda.is_available()
    with pytest.raises(ConfigError, match=r"gpus \[3\]: torch sees none of them .*models would run on the CPU"):
        ModelCache(MemoryProbe([3]))
    ModelCache(MemoryProbe(None))  # `gpus: all` on a machine without a GPU runs on the CPU, as asked


async def test_a_model_of_unknown_size_loads_alone() -> None:
    engine, reports = SizedEngine(), Reports()
    cache = cache_with(reports, limit_bytes=1000)
    engine.may_load.clear()

    hub_model = asyncio.create_task(cache.acquire(engine, spec("hub:0")))
    while engine.started != ["hub:0"]:
        await asyncio.sleep(0.01)
    other = asyncio.create_task(cache.acquire(engine, spec("b:100")))
    await asyncio.sleep(0.2)
    assert engine.started == ["hub:0"]  # the known one waits: the unknown one may need all the room
    assert ("b:100", LoadStage.WAITING_FOR_MEMORY) in reports.stages

    engine.may_load.set()
    await asyncio.wait_for(asyncio.gather(hub_model, other), timeout=5)
    assert engine.started == ["hub:0", "b:100"]


async def test_a_failed_load_gives_its_memory_back_and_keeps_no_traceback() -> None:
    engine, reports = SizedEngine(), Reports()
    cache = cache_with(reports, limit_bytes=1000)

    with pytest.raises(EngineError) as failure:
        await cache.acquire(engine, spec("broken:100"))

    assert failure.value.code == "model_load_failed"
    assert "the weights are corrupt" in failure.value.message
    # No chained exception keeps the half-loaded model's frames (and tensors) alive.
    assert failure.value.__cause__ is None and failure.value.__context__ is None
    assert engine.memory_releases == 1
