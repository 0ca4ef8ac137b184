"""`gpuctl up` as a supervisor: its children die with it, and a data dir has one supervisor at a time.

Each test runs the real `gpuctl up` as a process (every child a real process, a real nats-server) and
looks at its children through /proc, the way an operator would with `ps`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from sdk.broker import free_port
from sdk.local import LOCK_FILE, DataDirLock

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

#: nats-server, gateway, scheduler, projections and the local worker.
CHILDREN = 5
#: Stopping: an idle stack stops within this; with a client in a long poll, within the second.
IDLE_STOP_S = 5.0
WAITING_CLIENT_STOP_S = 10.0


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(child) for child in text.split()]


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def gpuctl_up(data_dir: Path, *flags: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "sdk.ctl", "up", "--data-dir", str(data_dir),
           "--http-port", str(free_port()), "--nats-port", str(free_port()), *flags]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"})


def wait_for(check: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


@contextmanager
def running_gpuctl_up(data_dir: Path, *flags: str, children: int = CHILDREN) -> Iterator[subprocess.Popen[bytes]]:
    """A running `gpuctl up` with all its children started; stopped (and its children killed) by PID after."""
    process = gpuctl_up(data_dir, *flags)
    seen: set[int] = set()
    try:
        def all_started() -> bool:
            assert process.poll() is None, f"gpuctl up exited: {process.stderr.read().decode() if process.stderr else ''}"
            seen.update(children_of(process.pid))
            return len(children_of(process.pid)) >= children

        wait_for(all_started, 90, f"gpuctl up to start its {children} children")
        yield process
    finally:
        seen.update(children_of(process.pid))
        process.kill()
        process.wait()
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with running_gpuctl_up(tmp_path) as process:
        yield process


def test_children_die_within_5s_when_gpuctl_up_is_killed(supervisor: subprocess.Popen[bytes]) -> None:
    children = children_of(supervisor.pid)
    assert len(children) == CHILDREN and all(alive(pid) for pid in children)

    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait()
    killed_at = time.monotonic()
    wait_for(lambda: not any(alive(pid) for pid in children), 5, f"children {children} to die with their supervisor")
    assert time.monotonic() - killed_at < 5


def test_a_second_gpuctl_up_on_the_same_data_dir_refuses_at_once(
    supervisor: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    children = children_of(supervisor.pid)
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == supervisor.pid

    started = time.monotonic()
    second = gpuctl_up(tmp_path)
    _, err = second.communicate(timeout=30)
    assert second.returncode == 1
    assert time.monotonic() - started < 15  # an interpreter's start; nothing waits for the store
    message = " ".join(err.decode().split())
    assert f"{tmp_path} is in use by another gpuctl up (pid {supervisor.pid})" in message
    # The first one is untouched: same children, all alive.
    assert children_of(supervisor.pid) == children and all(alive(pid) for pid in children)

    # Once its holder is gone (killed, so nothing cleaned up), the data dir is free at once.
    supervisor.kill()
    supervisor.wait()
    lock = DataDirLock(tmp_path)
    lock.acquire("http://127.0.0.1:1")
    lock.release()


def sigterm_and_time_the_stop(supervisor: subprocess.Popen[bytes]) -> float:
    """SIGTERM to `gpuctl up`; seconds until it and every child are gone (it must exit 0)."""
    children = children_of(supervisor.pid)
    started = time.monotonic()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0
    wait_for(lambda: not any(alive(pid) for pid in children), 30, f"children {children} to stop")
    return time.monotonic() - started


def api_of(data_dir: Path) -> tuple[str, str]:
    """The running stack's API URL and operator key, from its data dir (as `gpuctl keys` finds them)."""
    url = json.loads((data_dir / LOCK_FILE).read_text())["http_url"]
    key_file = data_dir / "secrets" / "operator.key"
    wait_for(key_file.exists, 60, "the gateway's first start to write the operator key")
    return url, key_file.read_text().strip()


def wait_for_the_worker(url: str, token: str) -> None:
    def online() -> bool:
        page = httpx.get(f"{url}/api/v1/workers", headers={"Authorization": f"Bearer {token}"}).json()
        return any(w["status"] == "online" for w in page["items"])

    wait_for(online, 90, "the local worker to be online")


def access_token(url: str, api_key: str) -> str:
    wait_for(lambda: _health(url) == 200, 60, "the gateway to answer")
    return str(httpx.post(f"{url}/api/v1/auth/token", json={"api_key": api_key}).json()["access_token"])


def _health(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health").status_code
    except httpx.TransportError:
        return None


def test_an_idle_stack_stops_within_5s_on_sigterm(supervisor: subprocess.Popen[bytes], tmp_path: Path) -> None:
    url, api_key = api_of(tmp_path)
    wait_for_the_worker(url, access_token(url, api_key))
    assert sigterm_and_time_the_stop(supervisor) < IDLE_STOP_S


def test_a_client_in_a_long_poll_does_not_hold_up_the_stop(tmp_path: Path) -> None:
    with running_gpuctl_up(tmp_path, "--no-worker", children=CHILDREN - 1) as supervisor:
        url, api_key = api_of(tmp_path)
        headers = {"Authorization": f"Bearer {access_token(url, api_key)}"}
        job = httpx.post(f"{url}/api/v1/jobs", json={"type": "echo"}, headers=headers).json()
        # No worker: the job cannot finish, and the client waits inside `/wait` until the stop.
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(httpx.get, f"{url}/api/v1/jobs/{job['id']}/wait", headers=headers, timeout=120)
            time.sleep(1.0)
            assert not waiting.done()
            stop_s = sigterm_and_time_the_stop(supervisor)
            answer = waiting.result(timeout=5)
        assert stop_s < WAITING_CLIENT_STOP_S
        assert answer.status_code == 503 and "Retry-After" in answer.headers
