"""The official `openai` client against a running platform (every component a process) with tiny models."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from sdk.errors import JobNotFound
from sdk.http import HttpClient
from sdk.local import LocalStack
from tests.conftest import wait_until
from tests.test_e2e_models import png_size

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def models(
    stack: LocalStack, tiny_gpt2: Path, tiny_encoder: Path, tiny_diffusion: Path
) -> AsyncIterator[dict[str, str]]:
    """w1 allows exactly the tiny models (w2 allows any model), as an operator would configure it."""
    names = {"llm": str(tiny_gpt2), "embedding": str(tiny_encoder), "image": str(tiny_diffusion)}
    async with HttpClient(stack.http_url, api_key=stack.operator_key) as http:
        w1 = next(w for w in await http.workers() if w.name == "w1")
        before = (await http.worker_config(w1.id)).overrides.get("models")
        await http.set_worker_config(w1.id, {"models": {name: {} for name in names.values()}})
        try:
            yield names
        finally:
            await http.set_worker_config(w1.id, {"models": before})


@pytest.fixture(scope="module")
async def api_key(stack: LocalStack) -> str:
    async with HttpClient(stack.http_url, api_key=stack.operator_key) as http:
        return (await http.create_api_key("openai-client")).api_key


@pytest.fixture
async def oai(stack: LocalStack, api_key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key=api_key, max_retries=0) as client:
        yield client


@pytest.fixture
async def mine(stack: LocalStack, api_key: str) -> AsyncIterator[HttpClient]:
    """The same API key through the platform's own client: it sees the jobs the requests became."""
    async with HttpClient(stack.http_url, api_key=api_key) as http:
        yield http


def job_id(openai_id: str) -> str:
    return openai_id.split("-", 1)[1]


async def test_models_lists_what_the_live_workers_serve(oai: openai.AsyncOpenAI, models: dict[str, str]) -> None:
    async def listed() -> bool:
        return set(models.values()) <= {m.id for m in (await oai.models.list()).data}

    await wait_until(listed, 10, "the allowed models in /v1/models")
    entry = next(m for m in (await oai.models.list()).data if m.id == models["llm"])
    assert entry.object == "model" and entry.owned_by == "gpu-fabric"


async def test_chat_completion_is_a_job_of_the_caller(
    oai: openai.AsyncOpenAI, mine: HttpClient, models: dict[str, str]
) -> None:
    reply = await oai.chat.completions.create(
        model=models["llm"],
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_tokens=6, temperature=0.8, seed=11, extra_body={"priority": 7},
    )
    text = reply.choices[0].message.content
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    job = await mine.get(job_id(reply.id))
    assert (job.type, job.status, job.priority, job.result["text"]) == ("llm", "completed", 7, text)
    assert job.params["messages"][1] == {"role": "user", "content": "Hello there"}
    assert job.params["seed"] == 11 and job.params["max_new_tokens"] == 6

    again = await oai.chat.completions.create(
        model=models["llm"], messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_completion_tokens=6, temperature=0.8, seed=11,
    )
    assert again.choices[0].message.content == text, "the same seed gives the same text"


async def test_streamed_chat_pieces_add_up_to_the_final_text(
    oai: openai.AsyncOpenAI, mine: HttpClient, models: dict[str, str]
) -> None:
    stream = await oai.chat.completions.create(
        model=models["llm"], messages=[{"role": "user", "content": "stream please"}],
        max_tokens=60, stream=True, stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    job = await mine.get(job_id(chunks[0].id))
    assert "".join(pieces) == job.result["text"]
    assert len([p for p in pieces if p]) > 1, "text arrives in pieces"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert finish == [job.result["finish_reason"]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == job.result["completion_tokens"]


async def test_completion_of_a_prompt_streamed_and_not(oai: openai.AsyncOpenAI, models: dict[str, str]) -> None:
    reply = await oai.completions.create(model=models["llm"], prompt="The quick brown", max_tokens=5, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5

    stream = await oai.completions.create(
        model=models["llm"], prompt="The quick brown", max_tokens=5, temperature=0, stream=True
    )
    assert "".join([c.choices[0].text async for c in stream]) == reply.choices[0].text


async def test_embeddings_as_floats_and_base64_for_one_text_or_many(
    oai: openai.AsyncOpenAI, models: dict[str, str]
) -> None:
    texts = ["The quick brown fox", "Hello world", "GPUs run inference jobs"]
    floats = await oai.embeddings.create(model=models["embedding"], input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    for item in floats.data:
        assert len(item.embedding) == 32
        assert math.isclose(sum(x * x for x in item.embedding), 1.0, rel_tol=1e-4)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(texts)

    raw = await oai.embeddings.create(model=models["embedding"], input=texts, encoding_format="base64")
    for as_float, as_base64 in zip(floats.data, raw.data, strict=True):
        decoded = struct.unpack("<32f", base64.b64decode(as_base64.embedding))
        assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(decoded, as_float.embedding, strict=True))

    # Without a format the client asks for base64 and decodes it itself.
    single = await oai.embeddings.create(model=models["embedding"], input="Hello world")
    assert len(single.data) == 1
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(single.data[0].embedding, floats.data[1].embedding))


async def test_images_as_base64_and_as_urls_of_the_job_results(
    stack: LocalStack, oai: openai.AsyncOpenAI, mine: HttpClient, models: dict[str, str]
) -> None:
    inline = await oai.images.generate(
        model=models["image"], prompt="a red square", n=2, size="64x80", extra_body={"seed": 3}
    )
    assert [png_size(base64.b64decode(d.b64_json)) for d in inline.data] == [(64, 80), (64, 80)]

    linked = await oai.images.generate(model=models["image"], prompt="a red square", size="64x64", response_format="url")
    url = linked.data[0].url
    assert url.startswith(stack.http_url + "/api/v1/jobs/") and url.endswith("/result/0")
    assert png_size(await mine.result(url.split("/")[-3], 0)) == (64, 64)
    async with httpx.AsyncClient() as plain:
        assert (await plain.get(url)).status_code == 401, "a result URL needs the owner's credentials"


async def test_unknown_model_is_404_model_not_found(oai: openai.AsyncOpenAI, models: dict[str, str]) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        await oai.chat.completions.create(model="no-such/model", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "model_not_found"
    assert refused.value.body["type"] == "invalid_request_error"

    with pytest.raises(openai.NotFoundError) as refused:
        await oai.embeddings.create(model=models["llm"] + "-missing", input="hi")
    assert refused.value.code == "model_not_found"


async def test_bad_key_is_401_and_bad_requests_are_400_in_openai_shape(
    stack: LocalStack, oai: openai.AsyncOpenAI, models: dict[str, str]
) -> None:
    async with openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="gfk_nope.nope", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as refused:
            await bad.models.list()
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"

    with pytest.raises(openai.BadRequestError) as refused:
        await oai.chat.completions.create(model=models["llm"], messages=[{"role": "user", "content": "hi"}], n=2)
    assert refused.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as refused:
        await oai.chat.completions.create(model=models["llm"], messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert refused.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as refused:
        await oai.images.generate(model=models["image"], prompt="x", size="big")
    assert refused.value.body["param"] == "size"


async def test_another_client_does_not_see_the_job(
    stack: LocalStack, oai: openai.AsyncOpenAI, models: dict[str, str]
) -> None:
    reply = await oai.completions.create(model=models["llm"], prompt="mine", max_tokens=2)
    async with HttpClient(stack.http_url, api_key=stack.operator_key) as operator:
        someone_else = (await operator.create_api_key("someone-else")).api_key
    async with HttpClient(stack.http_url, api_key=someone_else) as other:
        with pytest.raises(JobNotFound):
            await other.get(job_id(reply.id))
