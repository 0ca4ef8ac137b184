"""The transformers and diffusers engines, run for real on tiny random-weight models (CPU, offline)."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import struct
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import PIL.Image
import pytest
import torch
from nats.aio.client import Client as NatsClient
from nats.js.api import ObjectMeta
from transformers import GenerationConfig

from sdk import subjects
from sdk.api import ModelSettings
from tests.tiny_models import EOS, SENTENCES
from worker.engines.base import EngineError, JobContext, ModelSpec
from worker.engines.image import ImageEngine, LoadedPipeline
from worker.engines.llm import LLMEngine, LoadedLLM, _pieces, _WindowDecoder
from worker.engines.weights import OVERHEAD


@pytest.fixture(scope="session")
def llm(tiny_gpt2: Path) -> LoadedLLM:
    return LLMEngine().load_model(ModelSpec(name=str(tiny_gpt2)))


@pytest.fixture(scope="session")
def pipeline(tiny_diffusion: Path) -> LoadedPipeline:
    return ImageEngine().load_model(ModelSpec(name=str(tiny_diffusion)))


class Recorder:
    """A job context's outputs as the runtime would see them."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.progress: list[float] = []

    def context(self, params: dict[str, Any], **kwargs: Any) -> JobContext:
        return JobContext("job-1", 1, params, emit=self.emit, progress=self.on_progress, **kwargs)

    async def emit(self, chunk: str) -> None:
        self.chunks.append(chunk)

    async def on_progress(self, fraction: float, message: str | None = None) -> None:
        self.progress.append(fraction)


async def refused_as_bad_params(job: Awaitable[Any]) -> str:
    """The message of the `bad_params` error `job` fails with."""
    with pytest.raises(EngineError) as failure:
        await job
    assert failure.value.code == "bad_params"
    return failure.value.message


async def generate(llm: LoadedLLM, **params: Any) -> tuple[dict[str, Any], list[str]]:
    recorder = Recorder()
    result = await LLMEngine().inference(llm, recorder.context(params))
    return result, recorder.chunks


# --- LLM -----------------------------------------------------------------------------------------


async def test_llm_greedy_text_matches_transformers_with_token_counts(llm: LoadedLLM) -> None:
    result, _ = await generate(llm, prompt="The quick brown fox", max_new_tokens=12, temperature=0)

    inputs = llm.tokenizer("The quick brown fox", return_tensors="pt")
    expected = llm.model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0)
    new_tokens = expected[0, inputs["input_ids"].shape[1] :]
    assert result["text"] == llm.tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert result["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert result["completion_tokens"] == 12
    assert result["finish_reason"] == "length"
    assert result["time_to_first_token_ms"] > 0
    assert result["tokens_per_s"] > 0


async def test_streamed_chunks_add_up_to_the_text_in_order(llm: LoadedLLM) -> None:
    result, chunks = await generate(llm, prompt="Hello world", max_new_tokens=20, seed=7)

    assert len(chunks) > 1
    assert "".join(chunks) == result["text"]


async def test_same_seed_gives_same_text(llm: LoadedLLM) -> None:
    first, _ = await generate(llm, prompt="Hello", max_new_tokens=16, temperature=1.0, seed=42)
    again, _ = await generate(llm, prompt="Hello", max_new_tokens=16, temperature=1.0, seed=42)
    other, _ = await generate(llm, prompt="Hello", max_new_tokens=16, temperature=1.0, seed=43)

    assert first["text"] == again["text"]
    assert first["text"] != other["text"]


async def test_without_temperature_the_model_generation_config_decides(llm: LoadedLLM) -> None:
    # The tiny model's generation config does not sample, like GPT-2's: its default is greedy.
    default, _ = await generate(llm, prompt="Hello", max_new_tokens=16)
    greedy, _ = await generate(llm, prompt="Hello", max_new_tokens=16, temperature=0)

    assert not llm.model.generation_config.do_sample
    assert default["text"] == greedy["text"]


async def test_a_model_recommending_top_k_samples_only_among_its_top_k(tiny_gpt2: Path, tmp_path: Path) -> None:
    # A flat temperature would scatter samples over the vocabulary; a top_k of 1 leaves only the best token.
    path = tmp_path / "gpt2-top-k"
    shutil.copytree(tiny_gpt2, path)
    GenerationConfig(do_sample=True, temperature=5.0, top_k=1, eos_token_id=0).save_pretrained(path)
    recommends = LLMEngine().load_model(ModelSpec(name=str(path)))

    sampled = [await generate(recommends, prompt="Hello", max_new_tokens=16, seed=seed) for seed in (1, 2)]
    greedy, _ = await generate(recommends, prompt="Hello", max_new_tokens=16, temperature=0)

    assert [result["text"] for result, _ in sampled] == [greedy["text"]] * 2


def test_both_incremental_decoders_give_the_text_a_whole_decode_gives(llm: LoadedLLM) -> None:
    # The Rust stream serves tokenizers backed by the tokenizers library, the window any Python tokenizer.
    ids = llm.tokenizer(SENTENCES[2] + EOS + SENTENCES[3])["input_ids"]
    whole = llm.tokenizer.decode(ids, skip_special_tokens=True)

    for decoder in (_pieces(llm.tokenizer), _WindowDecoder(llm.tokenizer)):
        assert "".join(piece or "" for piece in map(decoder, ids)) == whole


async def test_generation_ends_before_the_first_stop_string(llm: LoadedLLM) -> None:
    full, _ = await generate(llm, prompt="Workers report", max_new_tokens=30, temperature=0)
    stop = full["text"][12:15]
    expected = full["text"][: full["text"].index(stop)]

    result, chunks = await generate(llm, prompt="Workers report", max_new_tokens=30, temperature=0, stop=[stop, "@@"])

    assert result["text"] == expected
    assert "".join(chunks) == expected
    assert result["finish_reason"] == "stop"
    assert result["completion_tokens"] < 30


async def test_messages_are_rendered_with_the_chat_template(llm: LoadedLLM) -> None:
    messages = [{"role": "user", "content": "Hello world"}]
    result, _ = await generate(llm, messages=messages, max_new_tokens=4, temperature=0)

    rendered = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert result["prompt_tokens"] == len(rendered["input_ids"])
    assert result["completion_tokens"] == 4


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({}, "`prompt` or `messages`"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "`prompt` or `messages`"),
        ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": 8193}, "max_new_tokens"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "stop": "x"}, "stop"),
        ({"prompt": "hi", "top_k": 5}, "top_k"),
        ({"prompt": "fox " * 200}, "the model reads 128 at most"),
    ],
)
async def test_bad_llm_params_are_rejected_naming_the_field(
    llm: LoadedLLM, params: dict[str, Any], named: str
) -> None:
    assert named in await refused_as_bad_params(generate(llm, **params))


async def test_cancel_stops_generation_early(llm: LoadedLLM) -> None:
    chunks: list[str] = []

    async def cancel_on_first_chunk(chunk: str) -> None:
        chunks.append(chunk)
        ctx.cancelled.set()

    params = {"prompt": "Hello", "max_new_tokens": 500, "temperature": 0}
    ctx = JobContext("job-1", 1, params, emit=cancel_on_first_chunk)
    with pytest.raises(EngineError) as failure:
        await LLMEngine().inference(llm, ctx)

    assert failure.value.code == "cancelled"
    assert 1 <= len(chunks) < 20


def test_memory_estimate_is_weight_bytes_at_the_target_dtype_plus_overhead_plus_the_kv_cache(
    tiny_gpt2: Path,
) -> None:
    engine = LLMEngine()
    settings = {"max_batch_tokens": 1000}
    as_float32 = engine.memory_required(ModelSpec(name=str(tiny_gpt2), settings=ModelSettings(dtype="float32", **settings)))
    as_float16 = engine.memory_required(ModelSpec(name=str(tiny_gpt2), settings=ModelSettings(dtype="float16", **settings)))

    weights_file = tiny_gpt2 / "model.safetensors"
    with weights_file.open("rb") as file:
        (header_bytes,) = struct.unpack("<Q", file.read(8))
        assert all(t["dtype"] == "F32" for k, t in json.loads(file.read(header_bytes)).items() if k != "__metadata__")
    data_bytes = weights_file.stat().st_size - 8 - header_bytes
    # Keys and values of 2 layers of 32 wide, for each of the 1000 tokens the batch may hold.
    kv_elements = 2 * 2 * 32 * 1000
    assert as_float32 == int(data_bytes * OVERHEAD) + kv_elements * 4
    assert as_float16 == int(data_bytes // 2 * OVERHEAD) + kv_elements * 2


def test_memory_estimate_counts_a_repo_that_ships_both_single_file_and_shards_once(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensor = {"w": torch.zeros(1000)}  # 4000 bytes as float32
    for name in ("model.safetensors", "consolidated.safetensors", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors"):
        save_file(tensor, tmp_path / name)
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    as_float32 = ModelSpec(name=str(tmp_path), settings=ModelSettings(dtype="float32"))

    # transformers reads the single file when there is one...
    assert LLMEngine().memory_required(as_float32) == int(4000 * OVERHEAD)
    # ...else the shards the index lists, never `consolidated.safetensors` beside them.
    (tmp_path / "model.safetensors").unlink()
    assert LLMEngine().memory_required(as_float32) == int(8000 * OVERHEAD)


def test_memory_estimate_of_a_model_not_on_disk_is_zero() -> None:
    assert LLMEngine().memory_required(ModelSpec(name="nobody/not-downloaded")) == 0


# --- Image ---------------------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


async def test_image_job_stores_pngs_of_the_asked_size(pipeline: LoadedPipeline, nc: NatsClient) -> None:
    store = await nc.jetstream().object_store(subjects.RESULTS_BUCKET)

    async def store_object(name: str, data: bytes, content_type: str) -> str:
        info = await store.put(name, data, meta=ObjectMeta(headers={"Content-Type": content_type}))
        return info.name

    recorder = Recorder()
    params = {
        "prompt": "a fox", "negative_prompt": "blurry", "width": 64, "height": 96, "steps": 2, "num_images": 2,
        "seed": 5,
    }
    result = await ImageEngine().inference(pipeline, recorder.context(params, store_object=store_object))

    assert [(i["index"], i["object"], i["width"], i["height"]) for i in result["images"]] == [
        (0, "job-1/0.png", 64, 96),
        (1, "job-1/1.png", 64, 96),
    ]
    assert all(i["content_type"] == "image/png" for i in result["images"])
    for image in result["images"]:
        assert png_size((await store.get(image["object"])).data) == (64, 96)
    assert (result["seed"], result["steps"]) == (5, 2)
    assert result["nsfw_filtered"] == [False, False]  # no safety checker in this pipeline
    assert recorder.progress == [0.5, 1.0]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"width": 64}, "prompt"),
        ({"prompt": "x", "width": 100}, "width"),
        ({"prompt": "x", "height": 4096}, "height"),
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "num_images": 9}, "num_images"),
    ],
)
async def test_bad_image_params_are_rejected_naming_the_field(
    pipeline: LoadedPipeline, params: dict[str, Any], named: str
) -> None:
    assert named in await refused_as_bad_params(ImageEngine().inference(pipeline, Recorder().context(params)))


async def test_cancelled_image_job_stops_between_steps_and_stores_nothing(pipeline: LoadedPipeline) -> None:
    stored: list[str] = []
    steps_done: list[float] = []

    async def store_object(name: str, data: bytes, content_type: str) -> str:
        stored.append(name)
        return name

    async def cancel_on_first_step(fraction: float, message: str | None = None) -> None:
        steps_done.append(fraction)
        ctx.cancelled.set()

    params = {"prompt": "a fox", "steps": 50}
    ctx = JobContext("job-1", 1, params, progress=cancel_on_first_step, store_object=store_object)
    with pytest.raises(EngineError) as failure:
        await ImageEngine().inference(pipeline, ctx)

    assert failure.value.code == "cancelled"
    assert stored == []
    assert 1 <= len(steps_done) < 50


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the default is bfloat16 or float16")
def test_default_dtype_on_cpu_is_float32(llm: LoadedLLM) -> None:
    assert llm.model.dtype == torch.float32


# --- Image jobs side by side on one pipeline ----------------------------------------------------


@pytest.fixture(scope="session")
def euler_pipeline(tiny_diffusion: Path) -> LoadedPipeline:
    """SDXL's default scheduler keeps a step index between calls: the case that shows sharing."""
    from diffusers import EulerDiscreteScheduler

    loaded = ImageEngine().load_model(ModelSpec(name=str(tiny_diffusion)))
    loaded.pipeline.scheduler = EulerDiscreteScheduler.from_config(loaded.pipeline.scheduler.config)
    return loaded


@pytest.fixture
def one_intra_op_thread() -> Iterator[None]:
    """Each torch op on one thread, so a job's arithmetic is the same alone or beside another: jobs side by
    side on a loaded machine otherwise split reductions differently, and a random-weight pipeline can grow
    that rounding past any tolerance over its steps. Sharing of step state still shows as a different picture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PngStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    async def put(self, name: str, data: bytes, content_type: str) -> str:
        self.objects[name] = data
        return name


IMAGE_PARAMS = {"prompt": "a fox", "width": 64, "height": 64, "steps": 8, "seed": 11}


async def image_job(pipeline: LoadedPipeline, job_id: str, store: PngStore) -> dict[str, Any]:
    ctx = JobContext(job_id, 1, IMAGE_PARAMS, store_object=store.put)
    return await ImageEngine().inference(pipeline, ctx)


def same_picture(first: bytes, second: bytes) -> bool:
    """Equal up to a level of rounding: threads running side by side on the CPU may split a reduction
    differently. A job that took another's scheduler steps gives a different picture, or none."""
    pixels = [list(PIL.Image.open(io.BytesIO(data)).convert("RGB").getdata()) for data in (first, second)]
    return len(pixels[0]) == len(pixels[1]) and all(
        abs(a - b) <= 2 for pa, pb in zip(*pixels) for a, b in zip(pa, pb)
    )


async def test_concurrent_image_jobs_on_one_model_each_give_the_image_they_give_alone(
    euler_pipeline: LoadedPipeline, one_intra_op_thread: None
) -> None:
    store = PngStore()
    alone = await image_job(euler_pipeline, "alone", store)

    results = await asyncio.gather(*(image_job(euler_pipeline, f"job-{n}", store) for n in range(2)))

    expected = store.objects[alone["images"][0]["object"]]
    assert [same_picture(store.objects[result["images"][0]["object"]], expected) for result in results] == [True] * 2


async def test_cancelling_one_image_job_leaves_the_other_whole(
    euler_pipeline: LoadedPipeline, one_intra_op_thread: None
) -> None:
    store = PngStore()
    alone = await image_job(euler_pipeline, "alone", store)

    async def cancel_at_second_step(fraction: float, message: str | None = None) -> None:
        if fraction >= 0.25:
            doomed.cancelled.set()

    doomed = JobContext("doomed", 1, IMAGE_PARAMS, progress=cancel_at_second_step, store_object=store.put)
    outcomes = await asyncio.gather(
        ImageEngine().inference(euler_pipeline, doomed), image_job(euler_pipeline, "kept", store), return_exceptions=True
    )

    assert isinstance(outcomes[0], EngineError) and outcomes[0].code == "cancelled"
    kept = outcomes[1]
    assert same_picture(store.objects[kept["images"][0]["object"]], store.objects[alone["images"][0]["object"]])
    assert not any(name.startswith("doomed/") for name in store.objects)
