"""OpenAI's wire format to the platform's jobs and back: pure translations, no stack."""

from __future__ import annotations

import base64
import struct

import msgspec
import pytest

from gateway import openai_wire as wire
from sdk.errors import BadRequest


def chat(**fields: object) -> wire.ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.convert(body, wire.ChatCompletionRequest, strict=True)


def test_chat_fields_become_llm_params() -> None:
    req = chat(
        messages=[{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}]}],
        max_tokens=9, max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=["", "\n"],
    )
    assert wire.llm_params(req) == {
        "messages": [{"role": "system", "content": "Be brief"}],
        "max_new_tokens": 7,  # the newer name wins
        "stop": ["\n"],  # an empty stop string is ignored
        "temperature": 0.5, "top_p": 0.9, "seed": 3,
    }
    assert wire.llm_params(chat(stop="END")) == {"messages": [{"role": "user", "content": "hi"}], "stop": ["END"]}


def test_too_many_stops_and_empty_inputs_are_bad_requests() -> None:
    with pytest.raises(BadRequest):
        wire.llm_params(chat(stop=[f"s{i}" for i in range(17)]))
    for value in ("", ["ok", ""], []):
        req = msgspec.convert({"model": "m", "input": value}, wire.EmbeddingRequest)
        with pytest.raises(BadRequest) as refused:
            wire.embedding_params(req)
        assert refused.value.details == {"param": "input"}


@pytest.mark.parametrize("field", [{"n": 2}, {"temperature": 2.5}, {"logit_bias": {}}, {"messages": []}])
def test_what_the_engine_cannot_do_is_refused_when_decoded(field: dict[str, object]) -> None:
    with pytest.raises(msgspec.ValidationError):
        chat(**field)


def test_image_sizes_are_brought_to_what_the_engine_takes() -> None:
    req = msgspec.convert({"model": "m", "prompt": "p", "size": "1023x20", "n": 2}, wire.ImageRequest)
    assert wire.image_params(req) == {"prompt": "p", "num_images": 2, "width": 1016, "height": 64}
    assert wire.image_side(5000) == 2048


def test_base64_embeddings_are_little_endian_float32() -> None:
    assert struct.unpack("<2f", base64.b64decode(wire.encode_vector([0.5, -1.0]))) == (0.5, -1.0)


def test_platform_fields_reach_the_job_and_bad_ones_name_the_field() -> None:
    req = chat(priority=5, region="eu-west", region_policy="strict")
    job = wire.submit_job("llm", req, "m", {"prompt": "x"})
    assert (job.type, job.model, job.priority, job.region, job.region_policy) == ("llm", "m", 5, "eu-west", "strict")
    with pytest.raises(BadRequest, match="max_latency_ms"):
        wire.submit_job("llm", chat(max_latency_ms=50), "m", {"prompt": "x"})
    assert wire.param_of("Expected `int` <= 1 - at `$.n`") == "n"
    assert wire.param_of("Object contains unknown field `colour`") == "colour"
