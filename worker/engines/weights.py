"""Where a model's weights go and how many bytes they take there.

Engines place a model on the GPU in bfloat16 (float16 where the GPU only emulates bfloat16) when torch
sees CUDA, else on the CPU in float32; `ModelSettings.dtype` overrides the dtype. The memory estimate
reads only file sizes, index files and safetensors headers, so the model cache can decide before
anything is loaded; engines add what runs beside the weights (an LLM's KV cache, a VAE's decode).

A model loaded in half precision reads the repo's `fp16` variant of its weights where it ships one
(`model.fp16.safetensors`, `unet/diffusion_pytorch_model.fp16.safetensors`): half the bytes to read
and no float32 copy in host memory on the way. A repo without one loads its usual files, cast.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from huggingface_hub import snapshot_download
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sdk.api import ModelSettings
from worker.engines.base import ModelSpec
from worker.engines.running import first_line

logger = logging.getLogger(__name__)

#: Activations and allocator slack on top of the weights themselves.
OVERHEAD = 1.2

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Bytes per element of the floating dtypes a safetensors header names; those are cast on load,
#: anything else (integer buffers, quantised blocks) keeps its stored size.
_FLOAT_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
#: The weight files transformers and diffusers look for, in the order they look (each may be sharded).
#: The variant half-precision loads prefer (the name diffusers and transformers give it).
FP16_VARIANT = "fp16"
_WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                 "diffusion_pytorch_model.bin")


def default_device() -> torch.device:
    # The first visible GPU: the worker narrows the choice with CUDA_VISIBLE_DEVICES.
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_dtype(settings: ModelSettings, device: torch.device) -> torch.dtype:
    if settings.dtype != "auto":
        return _DTYPES[settings.dtype]
    if device.type == "cuda":
        # T4 and V100 emulate bfloat16 (slowly); they get float16.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32


class _FromPretrained(Protocol):
    def from_pretrained(self, name: str, **kwargs: Any) -> Any: ...


L = TypeVar("L")


def load_transformers(auto_class: _FromPretrained, spec: ModelSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A transformers model (through `auto_class`, e.g. `AutoModelForCausalLM`) and its tokenizer, on the
    default device at the dtype its settings ask for, ready for inference."""
    device = default_device()
    dtype = load_dtype(spec.settings, device)
    trust = spec.settings.trust_remote_code
    logger.info("loading %s on %s as %s", spec.name, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(spec.name, trust_remote_code=trust)
    model = from_pretrained(
        auto_class.from_pretrained, spec.name, dtype, device_map=device.type, trust_remote_code=trust
    )
    return model.eval(), tokenizer


def from_pretrained(load: Callable[..., L], name: str, dtype: torch.dtype, **kwargs: Any) -> L:
    """`load(name, dtype=dtype, **kwargs)`, from the `fp16` variant of the weights when `dtype` is a half
    precision and the model ships one. A model on disk says so by its files; one on the hub not
    downloaded yet is asked for the variant first and loaded without it when it has none."""
    if dtype not in (torch.float16, torch.bfloat16):
        return load(name, dtype=dtype, **kwargs)
    root = local_files(name)
    if root is not None:
        variant = FP16_VARIANT if has_fp16_variant(root) else None
        return load(name, dtype=dtype, variant=variant, **kwargs)
    try:
        return load(name, dtype=dtype, variant=FP16_VARIANT, **kwargs)
    except (OSError, ValueError) as exc:
        # transformers and diffusers refuse a variant the repo does not have before downloading weights.
        logger.info("%s has no %s variant (%s): loading its usual weights", name, FP16_VARIANT, first_line(exc))
    return load(name, dtype=dtype, **kwargs)


def has_fp16_variant(root: Path) -> bool:
    """Whether weights under `root` come in the `fp16` variant: `model.fp16.safetensors`, its shards
    `model.fp16-00001-of-00002.safetensors` or their index `model.safetensors.index.fp16.json`."""
    return any(
        ".fp16." in path.name or ".fp16-" in path.name
        for path in root.rglob("*")
        if path.suffix in (*_WEIGHT_SUFFIXES, ".json")
    )


def local_files(name: str) -> Path | None:
    """The folder holding a model: the path itself, or its snapshot in the Hugging Face cache."""
    if Path(name).is_dir():
        return Path(name)
    try:
        # Offline on purpose: an estimate must never start a download.
        return Path(snapshot_download(name, local_files_only=True))
    except (ValueError, OSError):
        return None


def memory_required(name: str, settings: ModelSettings, beside: Callable[[Path, int], int] | None = None) -> int:
    """Bytes the model's weights take at the dtype it will load as, plus `OVERHEAD`, plus what `beside`
    says runs next to them (given the model's folder and bytes per float); 0 if unknown."""
    root = local_files(name)
    if root is None:
        logger.warning("model %s is not on disk or in the HF cache: its memory need is unknown (0)", name)
        return 0
    itemsize = load_dtype(settings, default_device()).itemsize
    return int(weight_bytes(root, itemsize) * OVERHEAD) + (0 if beside is None else beside(root, itemsize))


def weight_bytes(root: Path, itemsize: int) -> int:
    """Bytes of the weights `from_pretrained` reads under `root`, at `itemsize` bytes per float."""
    stored_itemsize = _config_itemsize(root)
    total = 0
    for path in weight_files(root):
        if path.suffix == ".safetensors":
            total += _safetensors_bytes(path, itemsize)
        else:
            # A pickle's dtypes are unknown without loading it: trust the config's dtype.
            total += path.stat().st_size * itemsize // stored_itemsize
    return total


def weight_files(root: Path) -> list[Path]:
    """The files `from_pretrained` would read, per folder: the single file it names, else the shards its
    index lists (a repo may ship both, and `consolidated.safetensors` beside them), safetensors over .bin;
    a folder without the usual names counts its base files (`model.fp16.safetensors` is a variant)."""
    folders = {p.parent for p in root.rglob("*") if p.suffix in _WEIGHT_SUFFIXES}
    chosen: list[Path] = []
    for folder in sorted(folders):
        chosen += _named_weights(folder) or _base_weights(folder)
    return chosen


def _named_weights(folder: Path) -> list[Path]:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            return sorted(folder / shard for shard in shards if (folder / shard).is_file())
    return []


def _base_weights(folder: Path) -> list[Path]:
    for suffix in _WEIGHT_SUFFIXES:
        files = sorted(folder.glob(f"*{suffix}"))
        base = [f for f in files if "." not in f.name.removesuffix(suffix)]
        if files:
            return base or files
    return []


def kv_cache_bytes(root: Path, itemsize: int, tokens: int) -> int:
    """Bytes of the KV cache holding `tokens` tokens, from the model's config (0 when it does not say)."""
    config = _read_config(root / "config.json")
    config = config.get("text_config", config)
    layers = config.get("num_hidden_layers") or config.get("n_layer") or 0
    heads = config.get("num_attention_heads") or config.get("n_head") or 0
    hidden = config.get("hidden_size") or config.get("n_embd") or 0
    if not (layers and heads and hidden):
        return 0
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return 2 * layers * kv_heads * head_dim * itemsize * tokens


def vae_decode_bytes(root: Path, itemsize: int) -> int:
    """The peak of one VAE decode at the pipeline's native size (images decode one at a time).

    The decoder's last blocks hold a few full-resolution feature maps of its widest top-level width;
    four of them is what SD 1.5 and SDXL peak at, within a few percent."""
    vae = _read_config(root / "vae" / "config.json")
    unet = _read_config(root / "unet" / "config.json") or _read_config(root / "transformer" / "config.json")
    channels = vae.get("block_out_channels") or []
    if not channels:
        return 0
    scale = 2 ** (len(channels) - 1)
    side = (unet.get("sample_size") or 64) * scale
    return 4 * side * side * channels[0] * itemsize


def _safetensors_bytes(path: Path, itemsize: int) -> int:
    with path.open("rb") as file:
        (header_len,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_len))
    total = 0
    for key, tensor in header.items():
        if key == "__metadata__":
            continue
        start, end = tensor["data_offsets"]
        stored = _FLOAT_ITEMSIZE.get(tensor["dtype"])
        total += (end - start) if stored is None else (end - start) // stored * itemsize
    return total


def _read_config(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _config_itemsize(root: Path) -> int:
    fields = _read_config(root / "config.json")
    # transformers 5 writes `dtype`, older versions `torch_dtype`.
    dtype = fields.get("dtype") or fields.get("torch_dtype")
    return _DTYPES[dtype].itemsize if dtype in _DTYPES else 4
