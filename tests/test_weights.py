"""How the engines read a model's weights: the `fp16` variant for half-precision loads where a model ships
one, its usual files where it does not (tiny random-weight models saved offline)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

from sdk.api import ModelSettings
from worker.engines.base import ModelSpec
from worker.engines.image import ImageEngine
from worker.engines.llm import LLMEngine
from worker.engines.weights import has_fp16_variant

#: A value written into the variant's copy of one embedding row only, so a load shows which file it read.
MARK = 0.25


@pytest.fixture
def gpt2_with_fp16_variant(tiny_gpt2: Path, tmp_path: Path) -> Path:
    """The tiny GPT-2 with its usual float32 weights and, beside them, an `fp16` variant with one marked row."""
    path = tmp_path / "gpt2-variant"
    shutil.copytree(tiny_gpt2, path)
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        model.transformer.wte.weight[1].fill_(MARK)
    model.half().save_pretrained(path, variant="fp16")
    return path


def first_row(path: Path, dtype: str) -> torch.Tensor:
    engine = LLMEngine()
    loaded = engine.load_model(ModelSpec(name=str(path), settings=ModelSettings(dtype=dtype)))  # type: ignore[arg-type]
    try:
        assert loaded.model is not None and loaded.model.dtype == getattr(torch, dtype)
        return loaded.model.transformer.wte.weight[1].float().clone()
    finally:
        engine.unload_model(loaded)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_load_reads_the_fp16_variant_where_the_model_ships_one(
    gpt2_with_fp16_variant: Path, dtype: str
) -> None:
    assert has_fp16_variant(gpt2_with_fp16_variant)
    assert torch.equal(first_row(gpt2_with_fp16_variant, dtype), torch.full((32,), MARK))


def test_a_float32_load_reads_the_usual_weights_beside_a_variant(gpt2_with_fp16_variant: Path) -> None:
    assert not torch.equal(first_row(gpt2_with_fp16_variant, "float32"), torch.full((32,), MARK))


def test_a_half_precision_load_of_a_model_without_the_variant_casts_its_usual_weights(tiny_gpt2: Path) -> None:
    usual = GPT2LMHeadModel.from_pretrained(tiny_gpt2).transformer.wte.weight[1]

    assert not has_fp16_variant(tiny_gpt2)
    assert torch.equal(first_row(tiny_gpt2, "float16"), usual.half().float())


def test_a_pipeline_that_ships_only_fp16_weights_loads_in_half_precision(tiny_diffusion: Path, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    path = tmp_path / "sd-fp16"
    DiffusionPipeline.from_pretrained(tiny_diffusion, dtype=torch.float16).save_pretrained(path, variant="fp16")
    assert not list(path.rglob("diffusion_pytorch_model.safetensors"))  # only `*.fp16.safetensors`

    engine = ImageEngine()
    loaded = engine.load_model(ModelSpec(name=str(path), settings=ModelSettings(dtype="float16")))
    try:
        assert loaded.pipeline is not None
        assert {loaded.pipeline.unet.dtype, loaded.pipeline.vae.dtype} == {torch.float16}
    finally:
        engine.unload_model(loaded)
