"""Text generation with transformers: a causal LM and its tokenizer, streamed token by token.

`generate()` runs in a thread and feeds `_TextAssembler`, which turns tokens into text, cuts it at the
first stop string and sends finished text to the job's stream. Sampling uses a generator of the job's
own, so a seed reproduces the text even while other jobs sample in other threads.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchEncoding,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from worker.engines import weights
from worker.engines.base import BaseEngine, EngineError, JobContext, ModelSpec
from worker.engines.running import parse_params, run_in_thread

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


class LLMEngine(BaseEngine):
    job_type = "llm"

    def memory_required(self, spec: ModelSpec) -> int:
        return weights.memory_required(spec.name, spec.settings)

    def load_model(self, spec: ModelSpec) -> LoadedLLM:
        device = weights.default_device()
        dtype = weights.load_dtype(spec.settings, device)
        trust = spec.settings.trust_remote_code
        logger.info("loading %s on %s as %s", spec.name, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec.name, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(
            spec.name, dtype=dtype, device_map=device.type, trust_remote_code=trust
        )
        return LoadedLLM(model=model.eval(), tokenizer=tokenizer)

    def unload_model(self, model: LoadedLLM) -> None:
        # Dropping the handle's references is what lets the weights go; the cache holds the handle.
        model.model = model.tokenizer = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    async def inference(self, model: LoadedLLM, ctx: JobContext) -> dict[str, Any]:
        params = parse_params(ctx.params, LLMParams)
        started = time.perf_counter()
        text = await run_in_thread(functools.partial(_generate, model, params), ctx.emit, ctx.cancelled)
        elapsed_s = time.perf_counter() - started
        completion_tokens = len(text.token_ids)
        eos_ids = _eos_ids(model)
        ended_by_model = completion_tokens > 0 and text.token_ids[-1] in eos_ids
        first_token_ms = None if text.first_token_at is None else (text.first_token_at - started) * 1000
        return {
            "text": text.sent,
            "prompt_tokens": text.prompt_tokens,
            "completion_tokens": completion_tokens,
            "time_to_first_token_ms": first_token_ms,
            "tokens_per_s": completion_tokens / elapsed_s if elapsed_s > 0 else 0.0,
            "finish_reason": "stop" if text.stopped or ended_by_model else "length",
        }


def _generate(
    handle: LoadedLLM, params: LLMParams, send: Callable[[str], None], halt: threading.Event
) -> _TextAssembler:
    model, tokenizer = handle.model, handle.tokenizer
    assert model is not None and tokenizer is not None, "inference on an unloaded model"
    inputs = _encode(tokenizer, params).to(model.device)
    prompt_tokens = inputs["input_ids"].shape[1]
    # Models with learned positions fail past their window: refuse a prompt that fills it, and
    # let the rest of the window bound the output (which then ends with `length`).
    window = getattr(model.config, "max_position_embeddings", None) or sys.maxsize
    if prompt_tokens == 0:
        raise EngineError("bad_params", "the prompt is empty once tokenized")
    if prompt_tokens >= window:
        raise EngineError("bad_params", f"the prompt is {prompt_tokens} tokens; the model reads {window} at most")
    max_new_tokens = min(params.max_new_tokens, window - prompt_tokens)
    text = _TextAssembler(tokenizer, params.stop, send, prompt_tokens)
    temperature, top_p = _sampling(params, model.generation_config)
    sampler = [] if temperature == 0 else [_Sampler(temperature, top_p, params.seed, model.device)]
    model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        # Sampling happens in `_Sampler`; greedy search then takes the one token it left.
        do_sample=False,
        logits_processor=LogitsProcessorList(sampler),
        stopping_criteria=StoppingCriteriaList([_Halt(lambda: halt.is_set() or text.stopped)]),
        streamer=text,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    return text


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


def _sampling(params: LLMParams, config: GenerationConfig) -> tuple[float, float]:
    """The job's temperature and top_p, each falling back to the model's recommendation."""
    temperature = (config.temperature or 1.0) if config.do_sample else 0.0
    top_p = (config.top_p or 1.0) if config.do_sample else 1.0
    return (
        temperature if params.temperature is None else params.temperature,
        top_p if params.top_p is None else params.top_p,
    )


def _eos_ids(handle: LoadedLLM) -> set[int]:
    assert handle.model is not None
    eos = handle.model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


class _TextAssembler(BaseStreamer):
    """Turns the tokens `generate()` produces into text and sends the text as soon as it is final.

    Text is final once no stop string can still begin in it: the last `len(longest stop) - 1`
    characters wait for the next token, and so does a character whose bytes are not all generated
    yet (it decodes as U+FFFD). At the first stop string everything before it is sent and the rest,
    the stop text included, never is.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: list[str], send: Callable[[str], None], prompt_tokens: int
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.send = send
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.prompt_tokens = prompt_tokens
        self.prompt_seen = False
        self.token_ids: list[int] = []
        self.decoded = ""
        #: The text sent so far; the job's result, so chunks always add up to it.
        self.sent = ""
        self.stopped = False
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        # generate() hands over the prompt first, then one token per step.
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.stopped:
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.token_ids += value.reshape(-1).tolist()
        self.decoded = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        hits = [i for s in self.stop if (i := self.decoded.find(s, len(self.sent))) >= 0]
        if hits:
            self.stopped = True
            self._send_until(min(hits))
            return
        end = len(self.decoded) - self.holdback
        while end > len(self.sent) and self.decoded[end - 1] == "\ufffd":
            end -= 1
        self._send_until(end)

    def end(self) -> None:
        if not self.stopped:
            self._send_until(len(self.decoded))

    def _send_until(self, end: int) -> None:
        if end > len(self.sent):
            chunk = self.decoded[len(self.sent) : end]
            self.sent += chunk
            self.send(chunk)


class _Sampler(LogitsProcessor):
    """Samples the next token with the job's own generator and leaves only it for greedy search.

    torch's global RNG is shared by every thread of the worker, so seeding it could not reproduce a
    job that runs beside others; a generator per job can (on the same device).
    """

    def __init__(self, temperature: float, top_p: float, seed: int | None, device: torch.device) -> None:
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(self.warpers(input_ids, scores), dim=-1)
        chosen = torch.multinomial(probs, num_samples=1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


class _Halt(StoppingCriteria):
    def __init__(self, should_halt: Callable[[], bool]) -> None:
        self.should_halt = should_halt

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_halt(), dtype=torch.bool, device=input_ids.device)
