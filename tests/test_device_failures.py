"""How the engines treat the device: out of memory, sticky CUDA errors, their own threads, unloading
under running work, the versions that honour `dtype=`, and a worker whose GPU failed for good."""

from __future__ import annotations

import asyncio
import threading
import time
import tomllib
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from sdk.api import ModelSettings
from sdk.http import HttpClient
from sdk.local import LocalStack
from tests.conftest import wait_until
from tests.test_engines import Recorder
from worker.config import LocalConfig
from worker.engines.base import DeviceLost, EngineError, JobContext, ModelSpec
from worker.engines.echo import EchoEngine
from worker.engines.image import ImageEngine
from worker.engines.llm import LLMEngine
from worker.engines.running import InFlight, run_in_thread
from worker.runtime import Worker

# --- The device: memory, threads, versions ---------------------------------------------------------


async def test_gpu_out_of_memory_is_reported_after_the_failed_work_let_go_of_its_tensors() -> None:
    held: list[weakref.ref[torch.Tensor]] = []

    def work(send: Any, halt: Any) -> None:
        activations = torch.ones(1024, 1024)
        held.append(weakref.ref(activations))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(EngineError) as failure:
        await run_in_thread(work, Recorder().emit, asyncio.Event(), InFlight())

    assert failure.value.code == "gpu_out_of_memory"
    assert "Tried to allocate 20.00 GiB" in failure.value.message
    assert failure.value.__context__ is None
    assert held[0]() is None


async def test_a_sticky_cuda_error_is_device_lost() -> None:
    def work(send: Any, halt: Any) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(DeviceLost) as failure:
        await run_in_thread(work, Recorder().emit, asyncio.Event(), InFlight())

    assert failure.value.code == "gpu_device_error"


async def test_inference_threads_leave_asyncio_default_pool_to_heartbeats() -> None:
    release = threading.Event()
    # More long jobs than asyncio's default pool has threads on any machine.
    jobs = [
        asyncio.ensure_future(run_in_thread(lambda send, halt: release.wait(30), Recorder().emit, asyncio.Event(), InFlight()))
        for _ in range(40)
    ]
    try:
        await asyncio.sleep(0.2)
        # What a heartbeat's telemetry does: a short call on the default pool.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "sampled"), timeout=5) == "sampled"
    finally:
        release.set()
        await asyncio.gather(*jobs)


def test_unload_waits_for_work_still_running_on_the_model() -> None:
    inflight, finished = InFlight(), threading.Event()

    def late_job() -> None:
        with inflight.running():
            time.sleep(0.3)
            finished.set()

    thread = threading.Thread(target=late_job)
    thread.start()
    time.sleep(0.05)
    inflight.wait_idle()
    assert finished.is_set()
    thread.join()


def test_engine_version_floors_honour_dtype(tiny_gpt2: Path, tiny_diffusion: Path) -> None:
    """`dtype=` is ignored by transformers before 4.56 and by diffusers before 0.40 (weights load in
    float32, twice the estimate): the `engines` extra must not allow them."""
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    floors = {
        Requirement(r).name: min(Version(s.version) for s in Requirement(r).specifier if s.operator == ">=")
        for r in pyproject["project"]["optional-dependencies"]["engines"]
    }
    assert floors["transformers"] >= Version("4.56") and floors["diffusers"] >= Version("0.40")

    half = ModelSpec(name=str(tiny_gpt2), settings=ModelSettings(dtype="float16"))
    assert {p.dtype for p in LLMEngine().load_model(half).model.parameters()} == {torch.float16}
    pipeline = ImageEngine().load_model(ModelSpec(name=str(tiny_diffusion), settings=ModelSettings(dtype="bfloat16")))
    assert {p.dtype for p in pipeline.pipeline.unet.parameters()} == {torch.bfloat16}


class LostDevice(EchoEngine):
    """An engine whose GPU fails for good on its first job (an illegal memory access, say)."""

    async def inference(self, model: Any, ctx: JobContext) -> Any:
        raise DeviceLost("gpu_device_error", "the GPU failed: CUDA error: an illegal memory access was encountered")


@pytest.mark.slow
async def test_a_worker_whose_gpu_failed_for_good_drains_instead_of_failing_every_job(
    stack: LocalStack, http: HttpClient, tmp_path: Path
) -> None:
    token = (await http.create_enrollment_token(ttl_s=60)).enrollment_token
    config = LocalConfig(
        nats_url=stack.worker_url, name="lost-gpu", region="lost-gpu", state_dir=tmp_path, enrollment_token=token
    )
    worker = Worker.from_config(config, {"echo": LostDevice()})
    try:
        await worker.start()
        job = await http.submit("echo", params={}, region="lost-gpu")
        done = await http.wait(job.id, timeout_s=30)
        assert (done.status, done.error.code if done.error else None) == ("failed", "gpu_device_error")

        await asyncio.wait_for(worker.device_lost.wait(), timeout=5)

        async def draining() -> bool:
            return (await http.worker(worker.worker_id or "")).status in ("draining", "offline", "deregistered")

        await wait_until(draining, 15, "the platform to see the worker stop taking jobs")
    finally:
        await worker.stop(drain=False)
        if worker.worker_id is not None:
            await http.revoke_worker(worker.worker_id)
