"""GPU telemetry through NVML, and host memory; a machine without an NVIDIA driver keeps working."""

from __future__ import annotations

import logging

import pytest

from worker import telemetry


def test_machine_without_a_driver_reports_no_gpus_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(telemetry, "_nvml_ready", None)  # as in a fresh worker process
    if telemetry.pynvml is not None:
        # Whatever this machine has, NVML's library is not where it is looked for.
        monkeypatch.setattr(telemetry.pynvml, "nvmlInit", _library_not_found)
    caplog.set_level(logging.INFO, logger=telemetry.__name__)

    snapshots = [telemetry.gpu_snapshot(), telemetry.gpu_snapshot([0]), telemetry.gpu_snapshot()]

    assert snapshots == [[], [], []]
    assert len([r for r in caplog.records if "reporting no GPUs" in r.getMessage()]) == 1


def _library_not_found() -> None:
    raise telemetry.pynvml.NVMLError(telemetry.pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)


def test_host_memory_free_is_within_the_machine_total() -> None:
    with open("/proc/meminfo") as meminfo:
        total_bytes = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))

    assert 0 < telemetry.memory_free_bytes() <= total_bytes


@pytest.mark.skipif(not telemetry.gpu_snapshot(), reason="needs an NVIDIA GPU and driver")
def test_gpu_snapshot_reports_each_gpu_memory() -> None:
    gpus = telemetry.gpu_snapshot()

    assert [g.index for g in gpus] == list(range(len(gpus)))
    for gpu in gpus:
        assert gpu.name
        assert gpu.memory_total_bytes > 0
        assert gpu.memory_used_bytes + gpu.memory_free_bytes <= gpu.memory_total_bytes
    assert telemetry.gpu_snapshot([len(gpus)]) == []
