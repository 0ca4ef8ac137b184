"""`gpuctl status`: the operator's one screen, run as a user runs it, against a running platform."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from sdk.http import HttpClient
from sdk.local import LocalStack

pytestmark = pytest.mark.slow


async def gpuctl(*args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sdk.ctl", *args, env={**os.environ, "COLUMNS": "220", **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


async def test_status_shows_components_leader_streams_and_workers_by_region(
    stack: LocalStack, http: HttpClient
) -> None:
    code, out = await gpuctl("status", "--url", stack.http_url, env={"GF_API_KEY": stack.operator_key})
    assert code == 0, out
    lines = out.splitlines()
    for component in ("gateway", "nats", "jetstream", "projections"):
        assert any(f"│ {component} " in line and " ok " in line for line in lines), (component, out)
    assert any("scheduler" in line and "leader " in line for line in lines), out
    for stream in ("JOBS", "WORKERS", "HEARTBEATS"):
        assert any(f"│ {stream} " in line for line in lines), (stream, out)
    for worker in await http.workers(status="online"):
        row = next((line for line in lines if f" {worker.id} " in line), None)
        assert row is not None, (worker.id, out)
        assert worker.region in row and worker.name in row and "online" in row


async def test_status_without_an_operator_key_says_so(stack: LocalStack, tmp_path: os.PathLike[str]) -> None:
    code, out = await gpuctl("status", "--url", stack.http_url, "--data-dir", str(tmp_path), env={"GF_API_KEY": ""})
    assert code == 1
    assert "no operator key" in out
