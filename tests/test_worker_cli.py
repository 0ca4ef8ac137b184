"""`gpu-worker` as a person runs it: `configure` writes the config file, `status`, `get`, `set` and `models`
talk to the session's platform about its worker w1, and `start --engines echo` runs as a real process.

The commands run in-process (`app.run_async`), exactly as the console script parses them; their exit
status is the `SystemExit` code and their output is what capsys captured.
"""

from __future__ import annotations

import io
import os
import re
import stat
import time
from pathlib import Path
from typing import NamedTuple

import msgspec
import pytest
from rich.console import Console

from sdk.api import WorkerConfigView, WorkerCredentials
from sdk.broker import free_port
from sdk.client import Client
from sdk.events import GpuInfo
from sdk.http import HttpClient
from sdk.local import LocalStack
from tests.conftest import enroll_over_nats, wait_until
from worker.cli import app, registered_worker_id
from worker.cli.console import Phase, ScreenSample, live_view
from worker.config import load_config
from worker.models import LoadedModel, LoadStage

VALID_KEYS = (
    "valid keys: max_concurrency, heartbeat_interval_s, load_control.acceptance_rate, "
    "models.<model>.trust_remote_code, models.<model>.dtype"
)


class Run(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def own_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The commands see an empty home: no config file or `GPU_WORKER_*` variable of whoever runs the tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    # Rich lays tables out for 80 columns when output is not a terminal; ids and paths must fit on a line.
    monkeypatch.setenv("COLUMNS", "200")
    for variable in list(os.environ):
        if variable.startswith("GPU_WORKER_") or variable in ("NATS_URL", "GF_API_KEY"):
            monkeypatch.delenv(variable)


@pytest.fixture
def platform(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> LocalStack:
    """The session's platform, with the commands run as its operator: the `platform` NATS user (in
    `stack.nats_url`) and an operator API key (`GF_API_KEY`, where the SDK looks for one)."""
    assert stack.operator_key is not None
    monkeypatch.setenv("GF_API_KEY", stack.operator_key)
    return stack


async def gpu_worker(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    with pytest.raises(SystemExit) as exited:
        await app.run_async(list(argv))
    out, err = capsys.readouterr()
    return Run(int(exited.value.code or 0), out, err)


def w1_flags(stack: LocalStack) -> list[str]:
    """The platform's URL (as its operator) and the state dir w1 registered from, as on w1's machine."""
    return ["--nats-url", stack.nats_url, "--state-dir", str(stack.data_dir / "workers" / "w1")]


def w1_id(stack: LocalStack) -> str:
    return registered_worker_id(stack.data_dir / "workers" / "w1")


class W1(NamedTuple):
    """The session's worker w1 as a test that changes its config found it."""

    id: str
    config: WorkerConfigView


@pytest.fixture
async def w1(platform: LocalStack, client: Client) -> W1:
    worker_id = w1_id(platform)
    return W1(worker_id, await client.worker_config(worker_id))


# --- configure -------------------------------------------------------------------------------------------


async def test_configure_non_interactive_writes_the_given_values_for_the_owner_only(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "worker.yaml"
    run = await gpu_worker(
        capsys, "configure", "--non-interactive", "--config", str(path),
        "--nats-url", "nats://worker:pw-123@platform.example:4222", "--region", "eu-west", "--name", "gpu-box-1", "--gpus", "all", "--enrollment-token", "enroll-secret-123",
        "--timeout-s", "0.5",
    )
    assert run.code == 0, run.err
    assert "Not enrolled yet: cannot reach the platform" in run.out  # so the token stays for `start`
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = load_config(path, env={})
    assert (written.nats_url, written.region, written.name, written.gpus) == (
        "nats://worker:pw-123@platform.example:4222", "eu-west", "gpu-box-1", "all"
    )
    assert written.enrollment_token == "enroll-secret-123"
    assert "nats://platform.example:4222" in run.out
    assert "enroll-secret-123" not in run.out + run.err, "the token is never shown"
    assert "pw-123" not in run.out + run.err, "nor the NATS password"


async def test_configure_non_interactive_refuses_a_bad_region_naming_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "worker.yaml"
    run = await gpu_worker(capsys, "configure", "--yes", "--config", str(path), "--region", "eu.west")
    assert run.code == 2
    assert "region 'eu.west' is not valid" in run.err
    assert not path.exists()


async def test_configure_asks_again_after_a_bad_answer_and_proposes_the_current_values_when_rerun(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "worker.yaml"
    # NATS URL, a bad region and then a good one, a name; Enter takes the proposed GPUs and (no) token.
    monkeypatch.setattr("sys.stdin", io.StringIO("nats://10.1.2.3:4222\neu.west\neu-west\nbox-7\n\n\n"))
    run = await gpu_worker(capsys, "configure", "--config", str(path))
    assert run.code == 0, run.err
    assert "region 'eu.west' is not valid" in run.out
    first = load_config(path, env={})
    assert (first.nats_url, first.region, first.name, first.gpus, first.enrollment_token) == (
        "nats://10.1.2.3:4222", "eu-west", "box-7", "all", None
    )

    # Re-run: Enter everywhere keeps what the file says; a flag answers its question without asking.
    monkeypatch.setattr("sys.stdin", io.StringIO("\n\n\n\n"))
    run = await gpu_worker(capsys, "configure", "--config", str(path), "--name", "box-8")
    assert run.code == 0, run.err
    again = load_config(path, env={})
    assert (again.nats_url, again.region, again.name) == ("nats://10.1.2.3:4222", "eu-west", "box-8")


async def test_configure_enrolls_and_the_started_worker_comes_back_as_that_worker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, stack: LocalStack, http: HttpClient
) -> None:
    path = tmp_path / "worker.yaml"
    token = (await http.create_enrollment_token(ttl_s=60)).enrollment_token
    flags = ["configure", "--yes", "--config", str(path), "--nats-url", stack.worker_url, "--region", "cli-enrolled",
             "--name", "enrolled-box", "--enrollment-token", token]
    run = await gpu_worker(capsys, *flags)
    assert run.code == 0, run.err
    config = load_config(path, env={})
    credentials = msgspec.json.decode(config.credentials_file.read_bytes(), type=WorkerCredentials)
    assert f"Enrolled as worker {credentials.worker_id}" in run.out
    assert stat.S_IMODE(config.credentials_file.stat().st_mode) == 0o600
    assert registered_worker_id(config.state_dir) == credentials.worker_id
    assert config.enrollment_token is None, "the spent token is not kept"
    assert token not in run.out + run.err + path.read_text()
    assert (await http.worker(credentials.worker_id)).name == "enrolled-box"

    run = await gpu_worker(capsys, *flags)
    # Refused by NATS itself: a spent token no longer admits the machine to register.
    assert (run.code, "already used" in run.err) == (1, True)

    # `start` signs its registration with the stored secret: the same worker, no token needed.
    stack._child("worker-enrolled", ["start", "--config", str(path), "--engines", "echo"], module="worker")
    try:
        # `configure` registered the worker already, so "online" alone proves nothing: wait for the
        # started process's heartbeats, which is what makes it a candidate for placement.
        async def beating() -> bool:
            worker = await http.worker(credentials.worker_id)
            return worker.status == "online" and worker.last_heartbeat is not None

        await wait_until(beating, 30, "the configured worker to start")
        job = await http.submit("echo", params={"via": "configure"}, region="cli-enrolled")
        done = await http.wait(job.id, timeout_s=30)
        assert (done.status, done.worker_id) == ("completed", credentials.worker_id)
    finally:
        stack.children.pop("worker-enrolled").stop()


# --- start -------------------------------------------------------------------------------------------------


async def test_start_refuses_an_unknown_engine_naming_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    run = await gpu_worker(capsys, "start", "--engines", "echo,gpu")
    assert run.code == 2
    assert "--engines 'echo,gpu': unknown engine 'gpu'; valid: echo, llm, image, embedding" in run.err


@pytest.mark.slow
async def test_an_echo_only_worker_serves_without_importing_torch(platform: LocalStack, client: Client) -> None:
    child = platform.start_worker("echo-only", "local", "--engines", "echo", env={"PYTHONPROFILEIMPORTTIME": "1"})
    try:
        async def online() -> bool:
            return any(
                w.name == "echo-only" and w.status == "online" and w.capabilities == ["echo"]
                for w in await client.workers()
            )

        await wait_until(online, 30, "the echo-only worker to register")
    finally:
        child.stop()
    assert child.process is not None and child.process.returncode == 0
    imports = child.log_path.read_text()
    assert re.search(r"\| +worker\.cli$", imports, re.M), "the import profile was written"
    assert not re.search(r"\| +torch(\.\w+)*$", imports, re.M), "torch was imported"


def test_the_live_screen_shows_jobs_gpus_models_and_a_model_being_loaded() -> None:
    snapshot = ScreenSample(
        name="box-1", region="eu-west", nats_url="nats://platform:4222", worker_id="wrk-1",
        engines=("echo", "llm"), capacity=4, in_flight=1, jobs_done=17,
        gpus=(GpuInfo(index=0, name="NVIDIA H200", memory_total_bytes=141 * 2**30, memory_used_bytes=12 * 2**30),),
        models=(LoadedModel("gpt2", 500 * 2**20, 0),),
    )
    console = Console(file=io.StringIO(), width=150, record=True)
    now_s = time.monotonic()
    console.print(live_view(snapshot, Phase.ONLINE, {"tiny-llama": (LoadStage.LOADING, now_s - 3)}, now_s))
    screen = console.export_text()
    assert "box-1  wrk-1  region eu-west  ● online" in screen
    assert "jobs: 1 in flight / capacity 4 · 17 done" in screen
    assert re.search(r"NVIDIA H200 +12\.0 GiB / 141\.0 GiB", screen)
    assert re.search(r"gpt2 +500\.0 MiB", screen)
    assert "loading tiny-llama (3s)" in screen


# --- status, get, set, models against the running platform -------------------------------------------------


@pytest.mark.slow
async def test_status_shows_the_worker_online(platform: LocalStack, capsys: pytest.CaptureFixture[str]) -> None:
    run = await gpu_worker(capsys, "status", *w1_flags(platform))
    assert run.code == 0, run.err
    assert "worker w1" in run.out
    assert re.search(rf"id +{w1_id(platform)}", run.out)
    assert re.search(r"status +online", run.out)
    assert re.search(r"last heartbeat +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+\.\ds ago\)", run.out)
    assert "No NVIDIA GPU found on this machine" in run.out or "GPUs on this machine" in run.out


async def test_status_explains_a_worker_that_never_registered(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = await gpu_worker(capsys, "status", "--state-dir", str(tmp_path / "empty"), "--nats-url", "nats://127.0.0.1:1")
    assert run.code == 1
    assert "this worker never registered with the platform" in run.err
    assert "Traceback" not in run.err


async def test_status_explains_an_unreachable_platform(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    run = await gpu_worker(capsys, "status", "--nats-url", url, "--worker-id", "wrk-1", "--timeout-s", "0.3")
    assert run.code == 1
    assert run.err.startswith("gpu-worker: cannot reach the platform: NATS at 127.0.0.1:")
    assert "Traceback" not in run.err


@pytest.mark.slow
async def test_set_acceptance_rate_reaches_the_running_worker_and_get_prints_it(
    platform: LocalStack, client: Client, w1: W1, capsys: pytest.CaptureFixture[str]
) -> None:
    worker_id, before = w1
    old_rate = before.effective.load_control.acceptance_rate
    try:
        run = await gpu_worker(capsys, "set", "load_control.acceptance_rate", "0.8", *w1_flags(platform))
        assert run.code == 0, run.err
        assert f"load_control.acceptance_rate: {old_rate} -> 0.8" in run.out
        assert (await client.worker_config(worker_id)).effective.load_control.acceptance_rate == 0.8

        log = platform.logs / "worker-w1.log"
        change = f"worker config changed: load_control: {{'acceptance_rate': {old_rate}}} -> {{'acceptance_rate': 0.8}}"

        async def applied() -> bool:
            return change in log.read_text()

        await wait_until(applied, 10, "the worker to log the new acceptance rate")

        run = await gpu_worker(capsys, "get", "load_control.acceptance_rate", *w1_flags(platform))
        assert (run.code, run.out) == (0, "0.8\n")
        run = await gpu_worker(capsys, "get", *w1_flags(platform))
        assert run.code == 0, run.err
        assert re.search(r"load_control\.acceptance_rate +0\.8 +this worker", run.out)
        assert re.search(r"max_concurrency +\d+ +(platform default|this worker)", run.out)
    finally:
        await client.set_worker_config(worker_id, {"load_control": before.overrides.get("load_control")})


async def test_get_with_an_operators_key_needs_no_nats_password(
    platform: LocalStack, capsys: pytest.CaptureFixture[str]
) -> None:
    # The URL names no user: the operator's key (GF_API_KEY) is the connection's NATS identity too.
    flags = ["--nats-url", platform.worker_url, "--state-dir", str(platform.data_dir / "workers" / "w1")]
    run = await gpu_worker(capsys, "get", "max_concurrency", *flags)
    assert run.code == 0, run.err
    assert run.out.strip().isdigit()


@pytest.mark.slow
async def test_set_max_concurrency_changes_the_capacity_and_null_brings_the_default_back(
    platform: LocalStack, client: Client, w1: W1, capsys: pytest.CaptureFixture[str]
) -> None:
    worker_id, before = w1
    assert "max_concurrency" not in before.overrides, "another test left its change behind"
    default = before.effective.max_concurrency

    async def capacity_is(expected: int) -> None:
        async def seen() -> bool:
            # The worker's own heartbeat reports the concurrency it now runs with.
            return (await client.worker(worker_id)).capacity == expected

        await wait_until(seen, 10, f"the platform to see capacity {expected}")

    try:
        run = await gpu_worker(capsys, "set", "max_concurrency", str(default + 2), *w1_flags(platform))
        assert run.code == 0, run.err
        await capacity_is(default + 2)
    finally:
        run = await gpu_worker(capsys, "set", "max_concurrency", "null", *w1_flags(platform))
    assert run.code == 0, run.err
    assert "max_concurrency" not in (await client.worker_config(worker_id)).overrides
    await capacity_is(default)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("bogus.key", "1", "unknown key `bogus.key`"),
        ("max_concurrency", "-1", "max_concurrency = -1: expected `int` >= 1"),
        ("models.gpt2.dtype", "fp8", "models.gpt2.dtype = fp8: invalid enum value 'fp8'; valid values: auto,"),
    ],
)
async def test_set_refuses_a_bad_key_or_value_listing_the_valid_keys_and_changes_nothing(
    platform: LocalStack, client: Client, w1: W1, capsys: pytest.CaptureFixture[str], key: str, value: str, why: str
) -> None:
    worker_id, before = w1
    run = await gpu_worker(capsys, "set", key, value, *w1_flags(platform))
    assert run.code == 2
    assert why in run.err
    assert VALID_KEYS in run.err
    assert await client.worker_config(worker_id) == before


@pytest.mark.slow
async def test_models_lists_a_loaded_model_with_the_memory_it_took(
    platform: LocalStack, client: Client, tiny_gpt2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A worker and region of this test's own: the session's workers keep no model and no load in their history.
    child = platform.start_worker("cli-models", "cli-models", "--engines", "llm")
    try:
        async def online() -> bool:
            return any(w.name == "cli-models" and w.status == "online" for w in await client.workers())

        await wait_until(online, 60, "the cli-models worker to register")
        model = str(tiny_gpt2)
        job = await client.submit("llm", model=model, region="cli-models", params={"prompt": "hi", "max_new_tokens": 2})
        done = await client.wait(job.id, timeout_s=60)
        assert done.status == "completed", done.error
        worker_id = registered_worker_id(platform.data_dir / "workers" / "cli-models")
        assert done.worker_id == worker_id

        async def known_loaded() -> bool:
            return model in (await client.worker(worker_id)).loaded_models

        await wait_until(known_loaded, 10, "the platform to know the model is loaded")
        flags = ["--nats-url", platform.nats_url, "--state-dir", str(platform.data_dir / "workers" / "cli-models")]
        run = await gpu_worker(capsys, "models", *flags)
    finally:
        child.stop()
    assert run.code == 0, run.err
    assert f"Models loaded on cli-models ({worker_id}):" in run.out
    assert re.search(rf"{re.escape(model)} +\d+(\.\d)? (B|KiB|MiB|GiB)\b", run.out), run.out


@pytest.mark.slow
async def test_models_says_when_none_is_loaded(
    platform: LocalStack, http: HttpClient, capsys: pytest.CaptureFixture[str]
) -> None:
    # A worker that never ran a model, enrolled just now (w1 and w2 may hold models other tests loaded).
    token = (await http.create_enrollment_token(ttl_s=60)).enrollment_token
    worker_id = (await enroll_over_nats(platform.worker_url, token, "no-models", "cli-none")).worker_id
    try:
        async def known() -> bool:
            return any(w.id == worker_id for w in await http.workers(region="cli-none"))

        await wait_until(known, 10, "the read model to know the new worker")
        run = await gpu_worker(capsys, "models", "--nats-url", platform.nats_url, "--worker-id", worker_id)
        assert run.code == 0, run.err
        assert run.out.startswith(f"No models loaded on no-models ({worker_id}).")
    finally:
        await http.revoke_worker(worker_id)
