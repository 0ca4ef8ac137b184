"""Continuous batching in the LLM engine, on the tiny GPT-2 (CPU, offline): every job's output equals
what it gives alone, whatever else shares the decode loop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sdk.api import ModelSettings
from tests.test_engines import Recorder, generate
from tests.tiny_models import SENTENCES
from worker.engines.base import EngineError, JobContext, ModelSpec
from worker.engines.batching import MAX_PREFILL_TOKENS
from worker.engines.llm import LLMEngine, LoadedLLM


@pytest.fixture(scope="module")
def llm(tiny_gpt2: Path) -> LoadedLLM:
    """A model of this module's own, so its batch counts only these tests' jobs."""
    return LLMEngine().load_model(ModelSpec(name=str(tiny_gpt2)))

# --- Continuous batching ---------------------------------------------------------------------------

BATCH_JOBS = [
    {"prompt": "The quick brown fox", "max_new_tokens": 24, "temperature": 0},
    {"prompt": "Hello", "max_new_tokens": 40, "temperature": 0},
    {"prompt": "Workers report progress, the scheduler places jobs, and", "max_new_tokens": 9, "temperature": 0},
    {"prompt": "GPUs run inference", "max_new_tokens": 30, "temperature": 0.8, "top_p": 0.9, "seed": 3},
    {"messages": [{"role": "user", "content": "Hello world"}], "max_new_tokens": 16, "temperature": 0},
]


async def alone(llm: LoadedLLM, params: dict[str, Any]) -> dict[str, Any]:
    result, chunks = await generate(llm, **params)
    assert "".join(chunks) == result["text"]
    return result


def same_output(batched: dict[str, Any], single: dict[str, Any]) -> tuple[Any, ...]:
    keys = ("text", "prompt_tokens", "completion_tokens", "finish_reason")
    return tuple(batched[k] for k in keys) == tuple(single[k] for k in keys)


async def test_jobs_with_prompts_of_different_lengths_decode_together_as_they_would_alone(llm: LoadedLLM) -> None:
    singles = [await alone(llm, params) for params in BATCH_JOBS]
    llm.batcher.peak_rows = 0

    batched = await asyncio.gather(*(generate(llm, **params) for params in BATCH_JOBS))

    assert llm.batcher.peak_rows >= 3  # they really shared the decode loop
    assert [same_output(result, single) for (result, _), single in zip(batched, singles)] == [True] * len(BATCH_JOBS)
    assert all("".join(chunks) == result["text"] for result, chunks in batched)


async def test_a_job_joining_mid_way_and_a_stop_string_leave_the_others_unchanged(llm: LoadedLLM) -> None:
    long = {"prompt": "Hello world", "max_new_tokens": 60, "temperature": 0}
    full = await alone(llm, {"prompt": "Workers report", "max_new_tokens": 30, "temperature": 0})
    stopping = {"prompt": "Workers report", "max_new_tokens": 30, "temperature": 0, "stop": [full["text"][12:15]]}
    singles = [await alone(llm, long), await alone(llm, stopping)]
    llm.batcher.peak_rows = 0
    joined = asyncio.Event()

    async def joins_after_a_few_chunks() -> dict[str, Any]:
        await joined.wait()
        return await alone(llm, stopping)

    recorder = Recorder()

    async def emit(chunk: str) -> None:
        recorder.chunks.append(chunk)
        if len(recorder.chunks) == 5:
            joined.set()

    first = LLMEngine().inference(llm, JobContext("first", 1, long, emit=emit))
    results = await asyncio.gather(first, joins_after_a_few_chunks())

    assert llm.batcher.peak_rows == 2
    assert same_output(results[0], singles[0]) and same_output(results[1], singles[1])
    assert results[1]["finish_reason"] == "stop" and results[1]["completion_tokens"] < 30
    assert "".join(recorder.chunks) == results[0]["text"]


async def test_a_long_prompt_joins_in_chunks_between_the_decode_steps_of_the_others(llm: LoadedLLM) -> None:
    running = {"prompt": "Hello world", "max_new_tokens": 60, "temperature": 0}
    joiners = [
        {"prompt": f"{SENTENCES[2]} {SENTENCES[0]}", "max_new_tokens": 12, "temperature": 0},  # many chunks
        {"prompt": "GPUs run", "max_new_tokens": 12, "temperature": 0},
    ]
    singles = [await alone(llm, params) for params in (running, *joiners)]
    llm.batcher.peak_rows = llm.batcher.peak_prefill_tokens = 0
    llm.batcher.max_prefill_tokens = 4
    chunks: list[str] = []
    decoding = asyncio.Event()

    async def emit(chunk: str) -> None:
        chunks.append(chunk)
        if len(chunks) == 3:
            decoding.set()

    async def joins_while_it_decodes(params: dict[str, Any]) -> dict[str, Any]:
        await decoding.wait()
        return await alone(llm, params)

    try:
        first = LLMEngine().inference(llm, JobContext("first", 1, running, emit=emit))
        results = await asyncio.gather(first, *(joins_while_it_decodes(params) for params in joiners))
    finally:
        llm.batcher.max_prefill_tokens = MAX_PREFILL_TOKENS

    assert llm.batcher.peak_rows == 3
    # While the first job decoded, no forward pass prefilled more than the budget.
    assert 0 < llm.batcher.peak_prefill_tokens <= 4
    assert results[1]["prompt_tokens"] > 4 * 3  # so its prompt really went in over several steps
    assert [same_output(result, single) for result, single in zip(results, singles)] == [True] * 3
    assert "".join(chunks) == results[0]["text"]


async def test_a_job_cancelled_in_the_middle_leaves_at_once_and_the_others_finish_unchanged(llm: LoadedLLM) -> None:
    kept = {"prompt": "The quick brown fox", "max_new_tokens": 40, "temperature": 0}
    single = await alone(llm, kept)
    chunks: list[str] = []

    async def cancel_on_third_chunk(chunk: str) -> None:
        chunks.append(chunk)
        if len(chunks) == 3:
            doomed.cancelled.set()

    doomed = JobContext("doomed", 1, {"prompt": "Hello", "max_new_tokens": 500, "temperature": 0}, emit=cancel_on_third_chunk)
    outcomes = await asyncio.gather(LLMEngine().inference(llm, doomed), generate(llm, **kept), return_exceptions=True)

    assert isinstance(outcomes[0], EngineError) and outcomes[0].code == "cancelled"
    assert 3 <= len(chunks) < 20
    assert same_output(outcomes[1][0], single)


async def test_batch_limits_follow_the_runtime_config_live(llm: LoadedLLM) -> None:
    singles = [await alone(llm, params) for params in BATCH_JOBS[:3]]
    engine = LLMEngine()
    try:
        engine.configure(llm, ModelSettings(max_batch_size=1))
        llm.batcher.peak_rows = 0
        one_at_a_time = await asyncio.gather(*(generate(llm, **params) for params in BATCH_JOBS[:3]))
        assert llm.batcher.peak_rows == 1
        # A KV budget for two of these jobs (prompt plus new tokens each) holds two rows at most.
        engine.configure(llm, ModelSettings(max_batch_tokens=64))
        llm.batcher.peak_rows = 0
        two_at_a_time = await asyncio.gather(*(generate(llm, **params) for params in BATCH_JOBS[:3]))
        assert llm.batcher.peak_rows == 2
    finally:
        engine.configure(llm, ModelSettings())

    for results in (one_at_a_time, two_at_a_time):
        assert [same_output(result, single) for (result, _), single in zip(results, singles)] == [True] * 3
