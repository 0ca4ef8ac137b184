"""Image generation with diffusers: any `DiffusionPipeline`, results stored as PNGs in the object store.

The pipeline runs in a thread; its step callback reports progress and stops it between steps when the
job is cancelled. Images never travel in events: each PNG goes to `results` as `<job_id>/<n>.png` and
the result names the objects.

Jobs on one model share its modules (UNet, VAE, text encoders) but never its scheduler or its interrupt
flag: each job runs a pipeline object of its own built from the loaded one's components with a fresh
scheduler (a scheduler keeps its step index between calls, so two jobs on one scheduler corrupt each
other). A float16 VAE that diffusers upcasts to float32 for the decode is changed in place, so such a
model runs its jobs one at a time.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import torch
from diffusers import DiffusionPipeline
from PIL.Image import Image

from worker.engines import weights
from worker.engines.base import EngineError, JobContext, ModelSpec
from worker.engines.running import InFlight, TorchEngine, free_cached_memory, on_device, parse_params, run_in_thread

logger = logging.getLogger(__name__)

#: Latents are an eighth of the image in each direction, so sizes come in steps of 8.
Side = Annotated[int, msgspec.Meta(ge=64, le=2048, multiple_of=8)]


class ImageParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    prompt: Annotated[str, msgspec.Meta(min_length=1)]
    negative_prompt: str | None = None
    #: None: the pipeline's native size.
    width: Side | None = None
    height: Side | None = None
    steps: Annotated[int, msgspec.Meta(ge=1, le=150)] = 30
    guidance_scale: Annotated[float, msgspec.Meta(ge=0.0, le=50.0)] = 7.5
    #: None: a random seed, returned in the result so the images can be made again.
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    num_images: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1


@dataclass
class LoadedPipeline:
    pipeline: DiffusionPipeline | None
    #: Held for the whole call when jobs cannot share the pipeline's modules (a float16 VAE upcast per call).
    exclusive: threading.Lock | None = None
    inflight: InFlight = field(default_factory=InFlight)


class ImageEngine(TorchEngine):
    job_type = "image"

    def memory_required(self, spec: ModelSpec) -> int:
        return weights.memory_required(spec.name, spec.settings, weights.vae_decode_bytes)

    def load_model(self, spec: ModelSpec) -> LoadedPipeline:
        return on_device(self._load, spec)

    def _load(self, spec: ModelSpec) -> LoadedPipeline:
        device = weights.default_device()
        dtype = weights.load_dtype(spec.settings, device)
        logger.info("loading %s on %s as %s", spec.name, device, dtype)
        pipeline = weights.from_pretrained(
            DiffusionPipeline.from_pretrained, spec.name, dtype, trust_remote_code=spec.settings.trust_remote_code
        )
        return prepare(pipeline, device)

    def unload_model(self, model: LoadedPipeline) -> None:
        # Dropping the handle's reference is what lets the weights go; the cache holds the handle.
        model.inflight.wait_idle()
        model.pipeline = None
        free_cached_memory()

    async def inference(self, model: LoadedPipeline, ctx: JobContext) -> dict[str, Any]:
        params = parse_params(ctx.params, ImageParams)
        # 32 bits, like most diffusion tools: the seed stays exact in any JSON client.
        seed = secrets.randbelow(2**32) if params.seed is None else params.seed
        started = time.perf_counter()
        pngs = await run_in_thread(
            functools.partial(_generate, model, params, seed), ctx.progress, ctx.cancelled, model.inflight
        )
        images = []
        for index, (png, width, height, _) in enumerate(pngs):
            name = await ctx.store_object(f"{ctx.job_id}/{index}.png", png, "image/png")
            images.append(
                {"index": index, "object": name, "width": width, "height": height, "content_type": "image/png"}
            )
        return {
            "images": images,
            # The SD 1.x safety checker replaces a flagged image with a black one: say which.
            "nsfw_filtered": [filtered for _, _, _, filtered in pngs],
            "seed": seed,
            "steps": params.steps,
            "elapsed_ms": (time.perf_counter() - started) * 1000,
        }


def prepare(pipeline: DiffusionPipeline, device: torch.device | str) -> LoadedPipeline:
    """A loaded pipeline on `device`, set up for jobs side by side."""
    pipeline.set_progress_bar_config(disable=True)
    vae = getattr(pipeline, "vae", None)
    if vae is not None and hasattr(vae, "enable_slicing"):
        # Several images decode one at a time: the decode's peak stays that of one image.
        vae.enable_slicing()
    upcasts = vae is not None and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    return LoadedPipeline(pipeline=pipeline.to(device), exclusive=threading.Lock() if upcasts else None)


def _generate(
    handle: LoadedPipeline, params: ImageParams, seed: int, send: Callable[[float], None], halt: threading.Event
) -> list[tuple[bytes, int, int, bool]]:
    loaded = handle.pipeline
    assert loaded is not None, "inference on an unloaded pipeline"
    _check_size(loaded, params)
    # The job's own pipeline object and scheduler; the modules (and their memory) stay shared.
    scheduler = loaded.scheduler.from_config(loaded.scheduler.config) if hasattr(loaded, "scheduler") else None
    pipeline = type(loaded)(**{**loaded.components, **({"scheduler": scheduler} if scheduler else {})})
    pipeline.set_progress_bar_config(disable=True)

    def on_step_end(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        send(min(1.0, (step + 1) / params.steps))
        if halt.is_set():
            # diffusers' documented way to stop a pipeline between steps.
            pipe._interrupt = True
        return tensors

    # Pipelines differ in what they take; a step callback is optional, a negative prompt is not.
    accepted = inspect.signature(pipeline.__call__).parameters
    if params.negative_prompt is not None and "negative_prompt" not in accepted:
        raise EngineError("bad_params", f"{type(pipeline).__name__} takes no `negative_prompt`")
    optional = {
        "negative_prompt": params.negative_prompt,
        "guidance_scale": params.guidance_scale,
        # Without it a pipeline runs to the end and only then sees a cancel.
        "callback_on_step_end": on_step_end,
    }
    with handle.exclusive or contextlib.nullcontext():
        output = pipeline(
            prompt=params.prompt,
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            num_images_per_prompt=params.num_images,
            # A CPU generator makes the same seed give the same noise on any device.
            generator=torch.Generator(device="cpu").manual_seed(seed),
            **{name: value for name, value in optional.items() if name in accepted},
        )
    if halt.is_set():
        return []  # cancelled: nothing to encode, the caller reports the cancel
    flagged = getattr(output, "nsfw_content_detected", None) or [False] * len(output.images)
    return [(_png(image), image.width, image.height, bool(f)) for image, f in zip(output.images, flagged)]


def _check_size(pipeline: DiffusionPipeline, params: ImageParams) -> None:
    """Sizes in steps of the pipeline's latent patch: 8 for SD and SDXL, 16 for SD3's 2x2 patches."""
    transformer = getattr(pipeline, "transformer", None)
    patch = getattr(getattr(transformer, "config", None), "patch_size", None) or 1
    step = getattr(pipeline, "vae_scale_factor", 8) * patch
    for name, side in (("width", params.width), ("height", params.height)):
        if side is not None and side % step:
            raise EngineError("bad_params", f"`{name}` must be a multiple of {step} for {type(pipeline).__name__}")


def _png(image: Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
