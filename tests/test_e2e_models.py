"""End to end with real engines on CPU: tiny random-weight models built in a temporary folder and
loaded through the same `from_pretrained` path as real ones (offline), run by `gpu-worker` processes."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from sdk.client import Client
from sdk.errors import JobError
from sdk.events import event_type
from sdk.http import HttpClient
from sdk.local import LocalStack
from tests.conftest import wait_until
from tests.tiny_models import build_tiny_gpt2

pytestmark = pytest.mark.slow


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def model_loads(client: Client, worker_id: str, model: str) -> int:
    """How many times `worker_id` reported loading `model` (its lifecycle events in the log)."""
    from sdk import subjects
    from sdk.events import WorkerModelLoaded, worker_event_decoder
    from sdk.log import read_subject

    raw = await read_subject(client.nc.jetstream(), subjects.WORKERS_STREAM, subjects.worker_subject(worker_id))
    events = [worker_event_decoder.decode(data) for data, _ in raw]
    return sum(1 for e in events if isinstance(e, WorkerModelLoaded) and e.model == model)


async def test_llm_job_returns_text_and_a_second_job_reuses_the_loaded_model(client: Client, tmp_path: Path) -> None:
    # A model of this test's own: no worker holds it before its first job (another module's jobs may have
    # loaded the session's tiny_gpt2 on both workers, and then either could take the second job).
    model = str(build_tiny_gpt2(tmp_path / "gpt2"))
    first = await client.submit("llm", model=model, params={"prompt": "hello world", "max_new_tokens": 8})
    done = await client.wait(first.id, timeout_s=60)
    assert done.status == "completed", done.error
    assert isinstance(done.result["text"], str)
    assert done.result["prompt_tokens"] > 0
    assert 0 < done.result["completion_tokens"] <= 8

    async def known_loaded() -> bool:
        return model in (await client.worker(done.worker_id)).loaded_models

    await wait_until(known_loaded, 10, "the platform to know the model is loaded")
    loads = await model_loads(client, done.worker_id, model)
    assert loads >= 1
    second = await client.submit("llm", model=model, params={"prompt": "hello again", "max_new_tokens": 4})
    again = await client.wait(second.id, timeout_s=60)
    assert again.status == "completed"
    assert again.worker_id == done.worker_id, "the scheduler prefers the worker that has the model"
    assert await model_loads(client, done.worker_id, model) == loads, "the warm model was not loaded again"


async def test_streamed_tokens_add_up_to_the_final_text(
    stack: LocalStack, client: Client, http: HttpClient, tiny_gpt2: Path
) -> None:
    # The job waits in a region with no worker yet, so both readers are following it before its worker
    # exists (a process start takes seconds): the tiny model can otherwise finish before they subscribe.
    params = {"prompt": "stream me", "max_new_tokens": 24, "temperature": 0.9, "seed": 7}
    job = await client.submit("llm", model=str(tiny_gpt2), region="stream-region", region_policy="strict", params=params)
    readers = asyncio.gather(
        _collect(client.stream(job.id, timeout_s=90)), _collect(http.stream(job.id, timeout_s=90))
    )
    streamer = stack.start_worker("streamer", "stream-region")
    try:
        via_nats, via_http = await readers
    finally:
        streamer.stop()
    done = await client.wait(job.id, timeout_s=10)
    assert "".join(via_nats) == done.result["text"]
    assert "".join(via_http) == done.result["text"]
    assert len(via_nats) > 1, "tokens arrive as they are generated, not as one piece"

    late = await _collect(client.stream(job.id))
    assert "".join(late) == done.result["text"], "a client that connects late still gets the final text"


async def test_stream_of_a_failed_job_raises(client: Client) -> None:
    job = await client.submit("echo", params={"fail": "no tokens today"})
    with pytest.raises(JobError):
        await _collect(client.stream(job.id, timeout_s=30))


async def test_image_job_returns_pngs_of_the_asked_size(
    client: Client, http: HttpClient, tiny_diffusion: Path
) -> None:
    params = {"prompt": "a red square", "width": 64, "height": 80, "steps": 2, "num_images": 2, "seed": 3}
    job = await client.submit("image", model=str(tiny_diffusion), params=params)
    done = await client.wait(job.id, timeout_s=90)
    assert done.status == "completed", done.error
    assert [image["index"] for image in done.result["images"]] == [0, 1]
    for index in (0, 1):
        assert png_size(await http.result(job.id, index)) == (64, 80)
        assert png_size(await client.result(job.id, index)) == (64, 80)
    history = [event_type(r.event) for r in await client.events(job.id)]
    assert "job.progress" in history


async def test_model_too_large_for_free_memory_fails_with_a_typed_error(
    stack: LocalStack, client: Client, tiny_gpt2: Path
) -> None:
    small = stack.start_worker("small", "tiny-region", env={"GPU_WORKER_MEMORY__LIMIT_BYTES": "1000"})
    try:
        async def online() -> bool:
            return any(w.name == "small" and w.status == "online" for w in await client.workers())

        await wait_until(online, 60, "the small worker")
        # Strict: only the small worker may take it (nearest would run it on a worker that has room).
        job = await client.submit(
            "llm", model=str(tiny_gpt2), region="tiny-region", region_policy="strict", params={"prompt": "hi"}
        )
        done = await client.wait(job.id, timeout_s=60)
        assert done.status == "failed"
        assert done.error.code == "insufficient_gpu_memory"
        assert done.error.details["required_bytes"] > done.error.details["free_bytes"]
        assert done.error.details["free_bytes"] <= 1000
        worker = await client.worker(done.worker_id)
        assert worker.name == "small" and worker.status == "online", "the worker stays healthy"
    finally:
        small.stop()


async def test_config_change_through_the_gateway_reaches_the_running_worker(client: Client, http: HttpClient) -> None:
    worker = next(w for w in await client.workers() if w.name == "w1")
    config = await http.worker_config(worker.id)
    before = config.effective.max_concurrency
    try:
        view = await http.set_worker_config(worker.id, {"max_concurrency": before + 3})
        assert view.effective.max_concurrency == before + 3

        async def applied() -> bool:
            # The worker's own heartbeat reports the concurrency it now runs with.
            return (await client.worker(worker.id)).capacity == before + 3

        await wait_until(applied, 10, "the worker to apply the new max_concurrency")
    finally:
        # Back to the worker's own value, or none (null): later tests expect the platform default.
        await http.set_worker_config(worker.id, {"max_concurrency": config.overrides.get("max_concurrency")})


async def _collect(pieces: object) -> list[str]:
    return [piece async for piece in pieces]  # type: ignore[attr-defined]
