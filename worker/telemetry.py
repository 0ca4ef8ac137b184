"""GPU and host telemetry, for heartbeats, registration and the model cache's memory checks.

NVML (nvidia-ml-py) reads the driver directly, without CUDA or torch. A machine without an NVIDIA
driver has no GPUs to report: that is logged once, and every later call just returns `[]`.
GPU indices are NVML's, which follow the PCI bus order (`CUDA_DEVICE_ORDER=PCI_BUS_ID`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import msgspec

from sdk.events import GpuInfo

try:
    import pynvml
except ImportError:  # nvidia-ml-py comes with the `engines` extra; an echo-only worker lacks it
    pynvml = None

logger = logging.getLogger(__name__)

#: Whether NVML initialised; None until the first call tries.
_nvml_ready: bool | None = None


class HostTelemetry(msgspec.Struct, frozen=True, kw_only=True):
    """What the worker reports about its machine: the GPUs it uses, and the memory free for models."""

    gpus: tuple[GpuInfo, ...] = ()
    memory_free_bytes: int | None = None


def select_gpus(indices: list[int] | None) -> None:
    """Make only the GPUs at `indices` (None: all) visible to CUDA. Call it before torch is imported:
    engines load onto `cuda:0`, which is then the first chosen GPU, the one the model cache measures."""
    if indices is None:
        return
    visible = ",".join(map(str, indices))
    if os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, visible):
        logger.warning("CUDA_VISIBLE_DEVICES=%s replaced by the configured gpus %s", os.environ["CUDA_VISIBLE_DEVICES"], visible)
    # NVML numbers GPUs in PCI bus order; CUDA must count the same way for the indices to agree.
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    logger.info("using GPUs %s", visible)


def gpu_snapshot(indices: list[int] | None = None) -> list[GpuInfo]:
    """The GPUs at `indices` (all when None) as the driver sees them now; [] without a driver."""
    if not _nvml():
        return []
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        logger.warning("NVML could not count GPUs: %s", exc)
        return []
    wanted = range(count) if indices is None else [i for i in indices if 0 <= i < count]
    gpus = []
    for index in wanted:
        try:
            gpus.append(_gpu_info(index))
        except pynvml.NVMLError as exc:
            # A GPU that fell off the bus is left out; the others still count.
            logger.warning("GPU %d did not answer NVML: %s", index, exc)
    return gpus


def memory_free_bytes() -> int | None:
    """Host memory available to new allocations without swapping; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _nvml() -> bool:
    global _nvml_ready
    if _nvml_ready is None:
        if pynvml is None:
            logger.info("nvidia-ml-py is not installed: reporting no GPUs")
            _nvml_ready = False
        else:
            try:
                pynvml.nvmlInit()
                _nvml_ready = True
            except pynvml.NVMLError as exc:
                logger.info("no NVIDIA driver (%s): reporting no GPUs", exc)
                _nvml_ready = False
    return _nvml_ready


def _gpu_info(index: int) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = _optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    temperature = _optional(lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
    power_mw = _optional(lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
    name = pynvml.nvmlDeviceGetName(handle)
    return GpuInfo(
        index=index,
        name=name.decode() if isinstance(name, bytes) else name,
        memory_total_bytes=int(memory.total),
        memory_used_bytes=int(memory.used),
        memory_free_bytes=int(memory.free),
        utilization_pct=None if utilization is None else float(utilization),
        temperature_c=None if temperature is None else float(temperature),
        power_w=None if power_mw is None else power_mw / 1000,
    )


def _optional(read: Callable[[], Any]) -> Any:
    # Many boards (MIG slices, some laptops) do not report every sensor; a missing one is None.
    try:
        return read()
    except pynvml.NVMLError:
        return None
