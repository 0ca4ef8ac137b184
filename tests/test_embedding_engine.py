"""The embedding engine, run for real on a tiny random-weight BERT loaded offline through from_pretrained."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from sdk.errors import InsufficientGpuMemory
from tests.test_engines import refused_as_bad_params
from worker.engines import available_engines
from worker.engines.base import EngineError, JobContext, ModelSpec
from worker.engines.embedding import EmbeddingEngine, LoadedEncoder
from worker.engines.weights import OVERHEAD
from worker.models import MemoryProbe, ModelCache

TEXTS = ["The quick brown fox", "GPUs run inference jobs for people who submit them and report progress.", "Hello"]


@pytest.fixture(scope="session")
def encoder(tiny_encoder: Path) -> LoadedEncoder:
    return EmbeddingEngine().load_model(ModelSpec(name=str(tiny_encoder)))


async def embed(encoder: LoadedEncoder, **params: Any) -> dict[str, Any]:
    return await EmbeddingEngine().inference(encoder, JobContext("job-1", 1, params))


def reference(encoder: LoadedEncoder, text: str) -> torch.Tensor:
    """One text alone, no padding: the mean of its token vectors, normalised."""
    inputs = encoder.tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder.model(**inputs).last_hidden_state[0]
    return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)


async def test_vectors_are_normalised_mean_pooled_encoder_states_in_input_order(encoder: LoadedEncoder) -> None:
    result = await embed(encoder, input=TEXTS)

    assert result["dimensions"] == encoder.model.config.hidden_size == 32
    assert len(result["embeddings"]) == len(TEXTS)
    for text, vector in zip(TEXTS, result["embeddings"], strict=True):
        assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-5)
        # Batched with longer texts (so padded), each still equals the text embedded alone.
        assert torch.allclose(torch.tensor(vector), reference(encoder, text), atol=1e-5)
    tokens = sum(len(encoder.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert result["prompt_tokens"] == tokens


async def test_batch_size_changes_nothing_but_the_passes(encoder: LoadedEncoder) -> None:
    one_by_one = await embed(encoder, input=TEXTS, batch_size=1)
    together = await embed(encoder, input=TEXTS, batch_size=32)

    for a, b in zip(one_by_one["embeddings"], together["embeddings"], strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    assert one_by_one["prompt_tokens"] == together["prompt_tokens"]


async def test_a_single_string_is_one_vector(encoder: LoadedEncoder) -> None:
    result = await embed(encoder, input="Hello world")

    assert len(result["embeddings"]) == 1
    assert torch.allclose(torch.tensor(result["embeddings"][0]), reference(encoder, "Hello world"), atol=1e-5)


async def test_text_longer_than_the_window_is_cut_not_failed(encoder: LoadedEncoder) -> None:
    result = await embed(encoder, input=["fox " * 500])

    assert result["prompt_tokens"] == 64, "cut at the model's 64 positions"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["ok", 3]}, "input"),
        ({"input": "ok", "batch_size": 0}, "batch_size"),
        ({"input": "ok", "pooling": "cls"}, "pooling"),
        ({}, "input"),
    ],
)
async def test_bad_embedding_params_are_rejected_naming_the_field(
    encoder: LoadedEncoder, params: dict[str, Any], field: str
) -> None:
    assert field in await refused_as_bad_params(embed(encoder, **params))


async def test_cancel_stops_between_batches(encoder: LoadedEncoder) -> None:
    batches: list[float] = []

    async def cancel_after_first_batch(fraction: float, message: str | None = None) -> None:
        batches.append(fraction)
        ctx.cancelled.set()

    ctx = JobContext("job-1", 1, {"input": TEXTS * 10, "batch_size": 2}, progress=cancel_after_first_batch)
    with pytest.raises(EngineError) as failure:
        await EmbeddingEngine().inference(encoder, ctx)
    assert failure.value.code == "cancelled"
    assert len(batches) < 15, "it stopped before running every batch"


async def test_model_cache_checks_memory_before_loading_an_encoder(tiny_encoder: Path) -> None:
    engine = EmbeddingEngine()
    spec = ModelSpec(name=str(tiny_encoder))
    needed = engine.memory_required(spec)
    weight_bytes = (tiny_encoder / "model.safetensors").stat().st_size
    assert weight_bytes * OVERHEAD * 0.9 < needed <= weight_bytes * OVERHEAD

    small = ModelCache(MemoryProbe(on_gpu=False), limit_bytes=needed - 1)
    with pytest.raises(InsufficientGpuMemory):
        await small.acquire(engine, spec)
    assert small.loaded() == []

    cache = ModelCache(MemoryProbe(on_gpu=False), limit_bytes=needed * 2)
    async with cache.use(engine, spec) as handle:
        result = await engine.inference(handle, JobContext("job-1", 1, {"input": "Hello"}))
    assert len(result["embeddings"][0]) == 32
    assert [m.model for m in cache.loaded()] == [str(tiny_encoder)]


def test_a_worker_finds_the_embedding_engine() -> None:
    assert isinstance(available_engines(["embedding"])["embedding"], EmbeddingEngine)
