"""What differs between diffusion pipelines, run for real at toy size on the CPU: SD 1.x's safety checker
(a blacked-out image is reported, not passed off as a picture) and SD3's sizes in steps of 16."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import PIL.Image
import pytest
import torch

from tests.test_engines import PngStore, refused_as_bad_params
from tests.tiny_models import character_clip_tokenizer
from worker.engines.base import JobContext
from worker.engines.image import ImageEngine, LoadedPipeline, prepare

PARAMS = {"prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": 3}


def with_safety_checker(tiny_diffusion: Path, *, flags_everything: bool) -> LoadedPipeline:
    """The tiny SD pipeline with a real `StableDiffusionSafetyChecker` of random weights whose concept
    thresholds (cosine similarities, within [-1, 1]) flag every image, or none."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0 if flags_everything else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    base = StableDiffusionPipeline.from_pretrained(tiny_diffusion)
    pipeline = StableDiffusionPipeline(
        **{**base.components, "safety_checker": checker, "requires_safety_checker": True,
           "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})},
    )
    return prepare(pipeline, "cpu")


async def run(loaded: LoadedPipeline, store: PngStore, **params: Any) -> dict[str, Any]:
    return await ImageEngine().inference(loaded, JobContext("job-1", 1, {**PARAMS, **params}, store_object=store.put))


@pytest.mark.parametrize("flags_everything", [True, False])
async def test_an_image_the_safety_checker_blacks_out_is_reported_as_filtered(
    tiny_diffusion: Path, flags_everything: bool
) -> None:
    store = PngStore()
    result = await run(with_safety_checker(tiny_diffusion, flags_everything=flags_everything), store, num_images=2)

    assert result["nsfw_filtered"] == [flags_everything] * 2
    for image in result["images"]:
        extrema = PIL.Image.open(io.BytesIO(store.objects[image["object"]])).convert("L").getextrema()
        assert (extrema == (0, 0)) == flags_everything  # black exactly when reported


@pytest.fixture(scope="module")
def sd3() -> LoadedPipeline:
    """A Stable-Diffusion-3-shaped pipeline at toy size: an MMDiT with 2x2 patches over a VAE that scales
    by 8 (so sizes come in steps of 16), two CLIP text encoders and no T5 (SD3 runs without one)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 4, 4, 4), latent_channels=4, norm_num_groups=2, layers_per_block=1, shift_factor=0.0,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    clip = CLIPTextConfig(vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, projection_dim=16, max_position_embeddings=77,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=CLIPTextModelWithProjection(clip), tokenizer=character_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=character_clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None,
    )
    return prepare(pipeline, "cpu")


async def test_sd3_takes_sizes_in_steps_of_16_and_refuses_others_naming_the_step(sd3: LoadedPipeline) -> None:
    store = PngStore()
    result = await run(sd3, store, width=80, height=64, guidance_scale=1.0)
    assert [(i["width"], i["height"]) for i in result["images"]] == [(80, 64)]

    # 72 is a multiple of 8 (what the request's schema checks) but not of SD3's 16.
    message = await refused_as_bad_params(run(sd3, store, width=72, height=64))
    assert message == "`width` must be a multiple of 16 for StableDiffusion3Pipeline"
