"""Where a model's weights go and how many bytes they take there.

Engines place a model on the GPU in bfloat16 (float16 where bfloat16 is unsupported) when torch sees
CUDA, else on the CPU in float32; `ModelSettings.dtype` overrides the dtype. The memory estimate reads
only file sizes and safetensors headers, so the model cache can decide before anything is loaded.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import torch
from huggingface_hub import snapshot_download

from sdk.api import ModelSettings

logger = logging.getLogger(__name__)

#: Activations, KV cache and allocator slack on top of the weights themselves.
OVERHEAD = 1.2

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Bytes per element of the floating dtypes a safetensors header names; those are cast on load,
#: anything else (integer buffers, quantised blocks) keeps its stored size.
_FLOAT_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def default_device() -> torch.device:
    # The first visible GPU: the worker narrows the choice with CUDA_VISIBLE_DEVICES.
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_dtype(settings: ModelSettings, device: torch.device) -> torch.dtype:
    if settings.dtype != "auto":
        return _DTYPES[settings.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def local_files(name: str) -> Path | None:
    """The folder holding a model: the path itself, or its snapshot in the Hugging Face cache."""
    if Path(name).is_dir():
        return Path(name)
    try:
        # Offline on purpose: an estimate must never start a download.
        return Path(snapshot_download(name, local_files_only=True))
    except (ValueError, OSError):
        return None


def memory_required(name: str, settings: ModelSettings) -> int:
    """Bytes the model's weights take at the dtype it will load as, plus `OVERHEAD`; 0 if unknown."""
    root = local_files(name)
    if root is None:
        logger.warning("model %s is not on disk or in the HF cache: its memory need is unknown (0)", name)
        return 0
    itemsize = load_dtype(settings, default_device()).itemsize
    stored_itemsize = _config_itemsize(root)
    total = 0
    for path in weight_files(root):
        if path.suffix == ".safetensors":
            total += _safetensors_bytes(path, itemsize)
        else:
            # A pickle's dtypes are unknown without loading it: trust the config's dtype.
            total += path.stat().st_size * itemsize // stored_itemsize
    return int(total * OVERHEAD)


def weight_files(root: Path) -> list[Path]:
    """The files `from_pretrained` would read: per folder safetensors over .bin, base over variants."""
    folders = {p.parent for p in root.rglob("*") if p.suffix in _WEIGHT_SUFFIXES}
    chosen: list[Path] = []
    for folder in sorted(folders):
        for suffix in _WEIGHT_SUFFIXES:
            files = sorted(folder.glob(f"*{suffix}"))
            # `model.fp16.safetensors` is a variant of `model.safetensors`; only one of them loads.
            base = [f for f in files if "." not in f.name.removesuffix(suffix)]
            if files:
                chosen += base or files
                break
    return chosen


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


def _config_itemsize(root: Path) -> int:
    config = root / "config.json"
    fields = json.loads(config.read_text()) if config.is_file() else {}
    # transformers 5 writes `dtype`, older versions `torch_dtype`.
    dtype = fields.get("dtype") or fields.get("torch_dtype")
    return _DTYPES[dtype].itemsize if dtype in _DTYPES else 4
