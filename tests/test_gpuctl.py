"""`gpuctl` is a client of the platform like any other: the contract (`sdk`) loads no service, the
services run as their own programs, and operator actions go through the HTTP admin API."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import sdk
from sdk.http import HttpClient
from sdk.local import LocalStack

SERVICES = ("gateway", "scheduler", "worker", "projections")


def test_importing_sdk_and_each_of_its_modules_loads_no_service() -> None:
    modules = ["sdk", *(f"sdk.{m.name}" for m in pkgutil.iter_modules(sdk.__path__))]
    assert "sdk.ctl" in modules and "sdk.local" in modules
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {SERVICES!r})))\n"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True).stdout)
    assert loaded == []


def gpuctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`gpuctl ARGS` as an operator runs it, in a process of its own, with no key in the environment."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GF_API_KEY", "GF_URL", "NATS_URL")}
    return subprocess.run(
        [sys.executable, "-m", "sdk.ctl", *args], capture_output=True, text=True, timeout=60,
        env={**clean, "COLUMNS": "200", **(env or {})},
    )


@pytest.mark.slow
async def test_gpuctl_keys_go_through_the_admin_api_of_the_stack_on_the_data_dir(
    stack: LocalStack, http: HttpClient
) -> None:
    # No URL given: gpuctl finds the gateway of the stack that holds the data dir, and its operator key.
    data_dir = ["--data-dir", str(stack.data_dir)]
    created = gpuctl("keys", "create", "from-gpuctl", *data_dir)
    assert created.returncode == 0, created.stderr
    api_key = created.stdout.strip()
    key = next(k for k in await http.list_api_keys() if k.name == "from-gpuctl")
    assert key.role == "client" and key.revoked_at_ms is None
    async with HttpClient(stack.http_url, api_key=api_key) as client:
        assert await client.list() is not None  # the printed key works

    listed = gpuctl("keys", "list", *data_dir)
    assert listed.returncode == 0 and key.key_id in listed.stdout and api_key not in listed.stdout

    revoked = gpuctl("keys", "revoke", key.key_id, *data_dir)
    assert revoked.returncode == 0, revoked.stderr
    assert next(k for k in await http.list_api_keys() if k.key_id == key.key_id).revoked_at_ms is not None

    enrolled = gpuctl("workers", "enroll", "--ttl-s", "60", *data_dir)
    assert enrolled.returncode == 0 and enrolled.stdout.strip()

    refused = gpuctl("workers", "rotate", "w-nobody", *data_dir)
    assert refused.returncode == 1 and "w-nobody" in refused.stderr and "Traceback" not in refused.stderr


def test_gpuctl_keys_without_an_operator_key_says_where_it_looked(tmp_path: Path) -> None:
    result = gpuctl("keys", "list", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert f"no operator key: set GF_API_KEY, or run where {tmp_path}/secrets/operator.key is" in " ".join(
        result.stderr.split()
    )


@pytest.mark.slow
async def test_gpuctl_replay_runs_the_projections_replay(stack: LocalStack, tmp_path: Path) -> None:
    db = tmp_path / "rebuilt.db"
    result = gpuctl("replay", "--db", str(db), env={"NATS_URL": stack.nats_url})
    assert result.returncode == 0, result.stderr
    assert f"rebuilt {db}" in " ".join(result.stderr.split()) and db.exists()


def test_each_service_parses_its_own_flags() -> None:
    for service in ("gateway", "scheduler", "projections"):
        result = gpuctl(service, "--help")
        assert result.returncode == 0 and f"python -m {service}" in result.stdout, (service, result.stderr)
        refused = gpuctl(service, "--no-such-flag")
        assert refused.returncode != 0 and "no-such-flag" in refused.stdout + refused.stderr
