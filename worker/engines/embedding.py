"""Text embeddings with transformers: an encoder's last hidden states, mean-pooled and L2-normalised.

A job embeds a list of texts (`input`); they run through the encoder in batches of `batch_size`, each
batch padded to its longest text and cut at the model's window. Pooling averages the token vectors under
the attention mask, so padding never moves a vector; normalising makes a dot product a cosine
similarity, which is what retrieval code expects. The result keeps the input order and counts tokens.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import torch
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase

from worker.engines import weights
from worker.engines.base import EngineError, JobContext, ModelSpec
from worker.engines.running import InFlight, TorchEngine, free_cached_memory, on_device, parse_params, run_in_thread

logger = logging.getLogger(__name__)

#: OpenAI's own limit on inputs per request.
MAX_INPUTS = 2048


class EmbeddingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: One text or several; a list embeds each, in order.
    input: (
        Annotated[str, msgspec.Meta(min_length=1)]
        | Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(min_length=1, max_length=MAX_INPUTS)]
    )
    #: Texts per forward pass: bounds activation memory whatever the size of the request.
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=256)] = 32
    normalize: bool = True

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


@dataclass
class LoadedEncoder:
    model: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase | None
    inflight: InFlight = field(default_factory=InFlight)


class EmbeddingEngine(TorchEngine):
    job_type = "embedding"

    def memory_required(self, spec: ModelSpec) -> int:
        return weights.memory_required(spec.name, spec.settings)

    def load_model(self, spec: ModelSpec) -> LoadedEncoder:
        return on_device(self._load, spec)

    def _load(self, spec: ModelSpec) -> LoadedEncoder:
        model, tokenizer = weights.load_transformers(AutoModel, spec)
        return LoadedEncoder(model=model, tokenizer=tokenizer)

    def unload_model(self, model: LoadedEncoder) -> None:
        # Work still running on it ends first; then dropping the handle's references lets the weights go.
        model.inflight.wait_idle()
        model.model = model.tokenizer = None
        free_cached_memory()

    async def inference(self, model: LoadedEncoder, ctx: JobContext) -> dict[str, Any]:
        params = parse_params(ctx.params, EmbeddingParams)
        vectors, tokens = await run_in_thread(
            functools.partial(_embed, model, params), ctx.progress, ctx.cancelled, model.inflight
        )
        return {
            "embeddings": vectors,
            "dimensions": len(vectors[0]) if vectors else 0,
            "prompt_tokens": tokens,
        }


def _embed(
    handle: LoadedEncoder, params: EmbeddingParams, send: Callable[[float], None], halt: threading.Event
) -> tuple[list[list[float]], int]:
    model, tokenizer = handle.model, handle.tokenizer
    assert model is not None and tokenizer is not None, "inference on an unloaded encoder"
    texts = params.texts()
    window = min(getattr(model.config, "max_position_embeddings", None) or sys.maxsize, tokenizer.model_max_length)
    if tokenizer.pad_token is None:
        # Decoder-style tokenizers have no pad token; any token works under a zero attention mask.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    vectors: list[list[float]] = []
    tokens = 0
    for start in range(0, len(texts), params.batch_size):
        if halt.is_set():
            return [], tokens  # the caller reports the cancel
        batch = texts[start : start + params.batch_size]
        inputs = tokenizer(batch, padding=True, truncation=True, max_length=window, return_tensors="pt")
        mask = inputs["attention_mask"].to(model.device)
        tokens += int(mask.sum())
        with torch.inference_mode():
            hidden = model(**inputs.to(model.device)).last_hidden_state
        pooled = mean_pool(hidden.float(), mask)
        if not torch.isfinite(pooled).all():
            # JSON has no NaN: a broken model's output must fail the job, not the report.
            raise EngineError("bad_output", f"{type(model).__name__} produced non-finite values")
        if params.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        vectors += pooled.cpu().tolist()
        send(min(1.0, (start + len(batch)) / len(texts)))
    return vectors, tokens


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The average of each text's token vectors, counting only real tokens (mask 1), not padding."""
    weights_ = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights_).sum(dim=1) / weights_.sum(dim=1).clamp(min=1e-9)
