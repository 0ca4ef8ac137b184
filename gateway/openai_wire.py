"""OpenAI's wire format and its translation to and from the platform's jobs: pure, no I/O.

A request becomes a `SubmitJob` (`*_job`), a finished job becomes OpenAI's response (`*_response`), and a
streamed piece becomes a chunk (`*_chunk`). Bounds follow OpenAI's documented ranges where the engines
accept them, so a request the engine would refuse is refused here, before any job exists. The platform's
own fields (`region`, `region_policy`, `max_latency_ms`, `priority`) ride along at the top level, as the `openai` client's `extra_body` puts
them. Requests are `Strict`: an unknown field is refused by name, and the OpenAPI document says so.
"""

from __future__ import annotations

import base64
import re
import struct
import time
from typing import Annotated, Any, Literal

import msgspec

from sdk.api import JobView, SubmitJob
from sdk.api.decoding import Strict, Token
from sdk.api.jobs import RegionPolicy
from sdk.errors import BadRequest

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
#: The engine's limits on what a union's items cannot say in the OpenAPI document (litestar drops
#: constraints inside unions), so they are checked once the request is decoded.
MAX_STOPS = 16
MAX_INPUTS = 2048
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=8192)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]


class PlatformFields(Strict):
    """What the platform adds to OpenAI's requests (`extra_body`); `user` is OpenAI's and ignored."""

    region: Token | None = None
    region_policy: RegionPolicy | None = None
    max_latency_ms: Annotated[float, msgspec.Meta(ge=0, le=60_000)] | None = None
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] | None = None
    user: Annotated[str, msgspec.Meta(max_length=256)] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    #: A string, or text parts (the only kind of part a text model reads).
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(PlatformFields, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    #: An empty stop string is ignored, as OpenAI does.
    stop: str | list[str] | None = None
    #: One choice per request: a job produces one text.
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None


class CompletionRequest(Sampling, kw_only=True):
    prompt: NonEmpty


class EmbeddingRequest(PlatformFields, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    #: One text, or up to 2048; none may be empty.
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"


#: `<width>x<height>`; each side is brought to what the engine takes: 64 to 2048, in steps of 8.
SIZE_PATTERN = r"^\d{1,4}x\d{1,4}$"


class ImageRequest(PlatformFields, kw_only=True):
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    prompt: NonEmpty
    n: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1
    size: Annotated[str, msgspec.Meta(pattern=SIZE_PATTERN)] | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    seed: Seed | None = None


# --- Requests -> jobs ----------------------------------------------------------------------------


def submit_job(job_type: str, req: PlatformFields, model: str, params: dict[str, Any]) -> SubmitJob:
    """The job for a request, with the platform's extra fields; a bad extra field is a `BadRequest`."""
    fields: dict[str, Any] = {"type": job_type, "model": model, "params": params}
    for name in ("region", "region_policy", "max_latency_ms", "priority"):
        if (value := getattr(req, name)) is not None:
            fields[name] = value
    try:
        return msgspec.convert(fields, SubmitJob)
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc), {"param": param_of(str(exc))}) from None


def llm_params(req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    if isinstance(req, ChatCompletionRequest):
        params: dict[str, Any] = {"messages": [{"role": m.role, "content": m.text()} for m in req.messages]}
        max_tokens = req.max_completion_tokens or req.max_tokens
    else:
        params, max_tokens = {"prompt": req.prompt}, req.max_tokens
    if max_tokens is not None:
        params["max_new_tokens"] = max_tokens
    stops = [s for s in ([req.stop] if isinstance(req.stop, str) else req.stop or []) if s]
    if len(stops) > MAX_STOPS:
        raise BadRequest(f"at most {MAX_STOPS} stop sequences, got {len(stops)}", {"param": "stop"})
    if stops:
        params["stop"] = stops
    for name in ("temperature", "top_p", "seed"):
        if (value := getattr(req, name)) is not None:
            params[name] = value
    return params


def embedding_params(req: EmbeddingRequest) -> dict[str, Any]:
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not 0 < len(texts) <= MAX_INPUTS or not all(texts):
        raise BadRequest(f"`input` must be 1 to {MAX_INPUTS} non-empty texts", {"param": "input"})
    return {"input": req.input}


def image_params(req: ImageRequest) -> dict[str, Any]:
    params: dict[str, Any] = {"prompt": req.prompt, "num_images": req.n}
    if req.size is not None:
        params["width"], params["height"] = (image_side(int(side)) for side in req.size.split("x"))
    if req.seed is not None:
        params["seed"] = req.seed
    return params


def image_side(pixels: int) -> int:
    """A requested side as the engine takes it: down to a multiple of 8, within 64 to 2048."""
    return min(2048, max(64, pixels - pixels % 8))


def param_of(message: str) -> str | None:
    """The top-level field a msgspec error names (`... - at `$.messages[0].role``) -> `messages`."""
    match = re.search(r"at `\$\.(\w+)", message) or re.search(r"field `(\w+)`", message)
    return match.group(1) if match else None


# --- Jobs -> responses ---------------------------------------------------------------------------


def created_at(job: JobView) -> int:
    """OpenAI's `created`: unix seconds of the submission."""
    stamp = job.submitted_at or job.finished_at
    return int(stamp.timestamp()) if stamp else int(time.time())


def usage(result: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(result.get("prompt_tokens", 0)), int(result.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_id(job_id: str, chat: bool) -> str:
    # The job's id inside: a user can look the request up in the platform's history.
    return f"{'chatcmpl' if chat else 'cmpl'}-{job_id}"


def text_response(job: JobView, chat: bool) -> dict[str, Any]:
    result = job.result
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.get("finish_reason", "stop"), "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": result["text"], "refusal": None}
    else:
        choice["text"] = result["text"]
    return {
        "id": completion_id(job.id, chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": created_at(job),
        "model": job.model,
        "choices": [choice],
        "usage": usage(result),
    }


def text_chunk(
    job_id: str, model: str, created: int, chat: bool, text: str | None, finish_reason: str | None = None
) -> dict[str, Any]:
    """One streamed piece; `text` None with a `finish_reason` is the closing chunk."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        choice["delta"] = {} if text is None else {"content": text}
    else:
        choice["text"] = text or ""
    return {
        "id": completion_id(job_id, chat),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(job: JobView, created: int, chat: bool) -> dict[str, Any]:
    """`stream_options.include_usage`: a last chunk with no choices and the request's usage."""
    return {
        "id": completion_id(job.id, chat),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": job.model,
        "choices": [],
        "usage": usage(job.result),
    }


def embedding_response(job: JobView, encoding_format: str) -> dict[str, Any]:
    vectors = job.result["embeddings"]
    tokens = int(job.result.get("prompt_tokens", 0))
    return {
        "object": "list",
        "model": job.model,
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v) if encoding_format == "base64" else v}
            for i, v in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def encode_vector(vector: list[float]) -> str:
    """OpenAI's `base64` encoding: the vector as little-endian float32s."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def models_response(served: dict[str, set[str]], created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "gpu-fabric", "job_types": sorted(types)}
            for name, types in sorted(served.items())
        ],
    }
