"""The echo engine, run the way the runtime runs it: `inference(None, JobContext)`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from worker.engines.base import EngineError, JobContext
from worker.engines.echo import EchoEngine


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


def test_echo_needs_no_model() -> None:
    assert EchoEngine.job_type == "echo"
    assert EchoEngine.needs_model is False


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
