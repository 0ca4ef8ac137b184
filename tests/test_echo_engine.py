"""The echo engine, run the way the runtime runs it: `inference(None, JobContext)`; and an echo job run by
a worker that has no model cache at all."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from sdk.http import HttpClient
from sdk.local import LocalStack
from tests.conftest import wait_until
from worker.config import LocalConfig
from worker.engines import available_engines
from worker.engines.base import EngineError, JobContext
from worker.engines.echo import EchoEngine
from worker.runtime import Worker


class Recorded:
    """What a job sent besides its result: streamed chunks and progress fractions."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.progress: list[float] = []

    async def emit(self, chunk: str) -> None:
        self.chunks.append(chunk)

    async def report_progress(self, fraction: float, message: str | None) -> None:
        self.progress.append(fraction)


def context(params: dict[str, Any], recorded: Recorded | None = None) -> JobContext:
    recorded = recorded or Recorded()
    return JobContext("job-1", 1, params, emit=recorded.emit, progress=recorded.report_progress)


async def test_echo_returns_its_params() -> None:
    params = {"prompt": "hello", "n": 3, "nested": {"a": [1, 2]}}
    assert await EchoEngine().inference(None, context(params)) == params


@pytest.mark.slow
async def test_an_echo_job_runs_on_a_worker_without_a_model_cache(
    stack: LocalStack, http: HttpClient, tmp_path: Path
) -> None:
    """A worker embedded in this process, built as `gpu-worker start --engines echo` builds it: no model
    cache, no model named by the job, and nothing loaded afterwards."""
    token = (await http.create_enrollment_token(ttl_s=60)).enrollment_token
    config = LocalConfig(
        nats_url=stack.worker_url, name="echo-only", region="echo-no-cache", state_dir=tmp_path, enrollment_token=token
    )
    worker = Worker.from_config(config, available_engines(["echo"]))
    try:
        async with worker:
            job = await http.submit("echo", params={"chunks": ["a", "b"]}, region="echo-no-cache")
            done = await http.wait(job.id, timeout_s=30)
            assert (done.status, done.worker_id, done.result) == ("completed", worker.worker_id, {"chunks": ["a", "b"]})

            async def acked() -> bool:  # the worker counts a job once its outcome is reported and acked
                return worker.jobs_done == 1

            await wait_until(acked, 5, "the worker to ack the job")
            assert worker.loaded_models == ()
            assert (await http.worker(done.worker_id or "")).loaded_models == []
    finally:
        if worker.worker_id is not None:
            await http.revoke_worker(worker.worker_id)


async def test_echo_sleeps_then_returns_with_progress_up_to_one() -> None:
    recorded = Recorded()
    started = time.monotonic()
    result = await EchoEngine().inference(None, context({"sleep_s": 0.3}, recorded))
    assert result == {"sleep_s": 0.3}
    assert time.monotonic() - started >= 0.3
    # One report as it starts, one per step, and 1.0 at the end, never going backwards.
    assert len(recorded.progress) == 3
    assert recorded.progress[0] < 0.1 and recorded.progress[-1] == 1.0
    assert recorded.progress == sorted(recorded.progress)


async def test_echo_emits_chunks_in_order() -> None:
    recorded = Recorded()
    await EchoEngine().inference(None, context({"chunks": ["a", "b", "c"]}, recorded))
    assert recorded.chunks == ["a", "b", "c"]


async def test_echo_cancel_ends_a_long_sleep_promptly() -> None:
    ctx = context({"sleep_s": 3600})
    job = asyncio.create_task(EchoEngine().inference(None, ctx))
    await asyncio.sleep(0.05)
    ctx.cancelled.set()
    with pytest.raises(EngineError) as raised:
        await asyncio.wait_for(job, timeout=2)
    assert raised.value.code == "cancelled"


async def test_echo_cancelled_before_streaming_emits_nothing() -> None:
    recorded = Recorded()
    ctx = context({"chunks": ["a", "b"]}, recorded)
    ctx.cancelled.set()
    with pytest.raises(EngineError) as raised:
        await EchoEngine().inference(None, ctx)
    assert raised.value.code == "cancelled"
    assert recorded.chunks == []


async def test_echo_fail_param_fails_with_its_message() -> None:
    with pytest.raises(EngineError) as raised:
        await EchoEngine().inference(None, context({"fail": "boom", "sleep_s": 0.01}))
    assert (raised.value.code, raised.value.message) == ("echo_failed", "boom")


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"sleep_s": -1}, "Expected `float` >= 0.0 - at `$.sleep_s`"),
        ({"sleep_s": 3601}, "Expected `float` <= 3600.0 - at `$.sleep_s`"),
        ({"sleep_s": "1"}, "Expected `float`, got `str` - at `$.sleep_s`"),
        ({"sleep_s": True}, "Expected `float`, got `bool` - at `$.sleep_s`"),
        ({"sleep_s": float("nan")}, "Expected `float` >= 0.0 - at `$.sleep_s`"),
        ({"fail": 3}, "Expected `str | null`, got `int` - at `$.fail`"),
        ({"chunks": "abc"}, "Expected `array`, got `str` - at `$.chunks`"),
    ],
)
async def test_echo_refuses_bad_params(params: dict[str, Any], expected: str) -> None:
    with pytest.raises(EngineError) as raised:
        await EchoEngine().inference(None, context(params))
    assert raised.value.code == "bad_params"
    assert raised.value.message == f"invalid echo params: {expected}"
