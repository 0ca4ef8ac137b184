"""Text generation with transformers: a causal LM and its tokenizer, streamed token by token.

Every job on a loaded model runs in its continuous batch (`batching.Batcher`, the only path). Each job
keeps its own `_TextAssembler`, which turns its tokens into text, cuts it at the first stop string and
sends finished text to the job's stream, and its own sampler: a generator of the job's own, so a seed
reproduces the text whatever else is in the batch.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import torch
from tokenizers.decoders import DecodeStream
from transformers import (
    AutoModelForCausalLM,
    BatchEncoding,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sdk.api import ModelSettings
from worker.engines import weights
from worker.engines.base import EngineError, JobContext, ModelSpec
from worker.engines.batching import Batcher, Sequence, pick_greedy
from worker.engines.running import TorchEngine, free_cached_memory, on_device, parse_params, relay

logger = logging.getLogger(__name__)


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: str
    content: str


class LLMParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    prompt: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    #: A chat, rendered with the tokenizer's chat template (a plain transcript when it has none).
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)] | None = None
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=8192)] = 128
    #: 0 picks the most likely token every step. None, here and for `top_p`: what the model's
    #: generation config recommends (greedy where it does not sample), as vLLM and transformers do.
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=10.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    #: Generation ends at the first of these; the stop text itself is not part of the output.
    stop: Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(max_length=16)] = []
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of `prompt` or `messages` is required")


@dataclass
class LoadedLLM:
    model: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase | None
    batcher: Batcher | None = None


class LLMEngine(TorchEngine):
    job_type = "llm"

    def memory_required(self, spec: ModelSpec) -> int:
        # The batch's KV cache at its full budget sits beside the weights.
        return weights.memory_required(
            spec.name,
            spec.settings,
            lambda root, itemsize: weights.kv_cache_bytes(root, itemsize, spec.settings.max_batch_tokens),
        )

    def load_model(self, spec: ModelSpec) -> LoadedLLM:
        return on_device(self._load, spec)

    def _load(self, spec: ModelSpec) -> LoadedLLM:
        model, tokenizer = weights.load_transformers(AutoModelForCausalLM, spec)
        batcher = Batcher(
            model, max_batch_size=spec.settings.max_batch_size, max_batch_tokens=spec.settings.max_batch_tokens
        )
        return LoadedLLM(model=model, tokenizer=tokenizer, batcher=batcher)

    def configure(self, model: LoadedLLM, settings: ModelSettings) -> None:
        if model.batcher is not None:
            model.batcher.max_batch_size = settings.max_batch_size
            model.batcher.max_batch_tokens = settings.max_batch_tokens

    def unload_model(self, model: LoadedLLM) -> None:
        # The decode loop ends first (jobs cut off after their grace period stop at the next step);
        # then dropping the handle's references is what lets the weights go.
        if model.batcher is not None:
            model.batcher.close()
        model.model = model.tokenizer = model.batcher = None
        free_cached_memory()

    async def inference(self, model: LoadedLLM, ctx: JobContext) -> dict[str, Any]:
        params = parse_params(ctx.params, LLMParams)
        started = time.perf_counter()
        job: dict[str, Any] = {}

        def start(send: Callable[[str], None], finish: Callable[[Any, BaseException | None], None], halt: threading.Event) -> None:
            job["sequence"], job["text"] = _sequence(model, params, send, finish, halt)
            assert model.batcher is not None, "inference on an unloaded model"
            model.batcher.submit(job["sequence"])

        finish_reason = await relay(start, ctx.emit, ctx.cancelled)
        sequence, text = job["sequence"], job["text"]
        elapsed_s = time.perf_counter() - started
        completion_tokens = len(sequence.tokens)
        first_token_ms = None if sequence.first_token_at is None else (sequence.first_token_at - started) * 1000
        return {
            "text": text.sent,
            "prompt_tokens": len(sequence.prompt_ids),
            "completion_tokens": completion_tokens,
            "time_to_first_token_ms": first_token_ms,
            "tokens_per_s": completion_tokens / elapsed_s if elapsed_s > 0 else 0.0,
            "finish_reason": finish_reason,
        }


def _sequence(
    handle: LoadedLLM,
    params: LLMParams,
    send: Callable[[str], None],
    finish: Callable[[Any, BaseException | None], None],
    halt: threading.Event,
) -> tuple[Sequence, _TextAssembler]:
    model, tokenizer = handle.model, handle.tokenizer
    assert model is not None and tokenizer is not None, "inference on an unloaded model"
    prompt_ids = _encode(tokenizer, params)["input_ids"][0].tolist()
    # Models with learned positions fail past their window: refuse a prompt that fills it, and
    # let the rest of the window bound the output (which then ends with `length`).
    window = getattr(model.config, "max_position_embeddings", None) or sys.maxsize
    if not prompt_ids:
        raise EngineError("bad_params", "the prompt is empty once tokenized")
    if len(prompt_ids) >= window:
        raise EngineError("bad_params", f"the prompt is {len(prompt_ids)} tokens; the model reads {window} at most")
    text = _TextAssembler(tokenizer, params.stop, send)

    def ended(reason: str | None, error: BaseException | None) -> None:
        if error is None:
            text.end()
        finish(reason, error)

    temperature, top_p, top_k = _sampling(params, model.generation_config)
    sequence = Sequence(
        prompt_ids=prompt_ids,
        max_new_tokens=min(params.max_new_tokens, window - len(prompt_ids)),
        pick=pick_greedy if temperature == 0 else _Sampler(temperature, top_p, top_k, params.seed, model.device),
        on_token=text.add,
        finish=ended,
        eos_ids=frozenset(_eos_ids(model.generation_config)),
        halt=halt,
    )
    return sequence, text


def _encode(tokenizer: PreTrainedTokenizerBase, params: LLMParams) -> BatchEncoding:
    if params.messages is None:
        return tokenizer(params.prompt, return_tensors="pt")
    messages = [{"role": m.role, "content": m.content} for m in params.messages]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
    # A base model has no chat format; a plain transcript is the closest thing it understands.
    transcript = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(transcript, return_tensors="pt")


def _sampling(params: LLMParams, config: GenerationConfig) -> tuple[float, float, int]:
    """The job's temperature and top_p, each falling back to the model's recommendation, and the
    model's recommended top_k when it samples."""
    temperature = (config.temperature or 1.0) if config.do_sample else 0.0
    top_p = (config.top_p or 1.0) if config.do_sample else 1.0
    top_k = (config.top_k or 0) if config.do_sample else 0
    return (
        temperature if params.temperature is None else params.temperature,
        top_p if params.top_p is None else params.top_p,
        top_k,
    )


def _eos_ids(config: GenerationConfig) -> set[int]:
    eos = config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


class _TextAssembler:
    """Turns a job's tokens into text and sends the text as soon as it is final.

    Text is final once no stop string can still begin in it: the last `len(longest stop) - 1`
    characters wait for the next token. Each token is decoded incrementally (`_pieces`), so it costs the
    same however long the text is, and a character whose bytes are not all generated yet waits. At the
    first stop string everything before it is sent and the rest, the stop text included, never is.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str], send: Callable[[str], None]) -> None:
        self.stop = stop
        self.send = send
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.piece = _pieces(tokenizer)
        self.decoded = ""
        #: The text sent so far; the job's result, so chunks always add up to it.
        self.sent = ""
        self.stopped = False

    def add(self, token: int) -> bool:
        """Take one token; True once the text reached a stop string."""
        piece = self.piece(token)
        if not piece:
            return False  # an incomplete character (or a special token): wait for more
        self.decoded += piece
        # A stop string may begin in text not sent yet, up to `holdback` characters back.
        hits = [i for s in self.stop if (i := self.decoded.find(s, len(self.sent))) >= 0]
        if hits:
            self.stopped = True
            self._send_until(min(hits))
            return True
        self._send_until(len(self.decoded) - self.holdback)
        return False

    def end(self) -> None:
        if not self.stopped:
            self._send_until(len(self.decoded))

    def _send_until(self, end: int) -> None:
        if end > len(self.sent):
            chunk = self.decoded[len(self.sent) : end]
            self.sent += chunk
            self.send(chunk)


def _pieces(tokenizer: PreTrainedTokenizerBase) -> Callable[[int], str | None]:
    """The text each new token adds (None while a character is incomplete). A tokenizer backed by the
    tokenizers library decodes in Rust (`DecodeStream`, about 1 µs a token, which matters in a decode loop
    of many rows); a Python tokenizer decodes a window from the last complete character on, as TGI does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        stream = DecodeStream(skip_special_tokens=True)
        return lambda token: stream.step(backend, token)
    return _WindowDecoder(tokenizer)


class _WindowDecoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        #: Where the decode window starts, and where its already-decoded part ends.
        self.prefix_offset = 0
        self.read_offset = 0

    def __call__(self, token: int) -> str | None:
        self.token_ids.append(token)
        known = self._decode(self.prefix_offset, self.read_offset)
        window = self._decode(self.prefix_offset, len(self.token_ids))
        if len(window) <= len(known) or window.endswith("\ufffd"):
            return None
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return window[len(known) :]

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=True)


class _Sampler:
    """Samples the next token with the job's own generator.

    torch's global RNG is shared by every job of the worker, so seeding it could not reproduce a
    job that runs beside others; a generator per job can (on the same device).
    """

    def __init__(self, temperature: float, top_p: float, top_k: int, seed: int | None, device: torch.device) -> None:
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        # The warpers read no input ids; they take a batch of one row.
        scores = self.warpers(None, logits[None].float())
        return int(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=self.generator))
