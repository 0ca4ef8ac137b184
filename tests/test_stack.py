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
from pathlib import Path

import pytest

from sdk.broker import free_port
from sdk.local import LOCK_FILE, DataDirLock

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

#: nats-server, gateway, scheduler, projections and the local worker.
CHILDREN = 5


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


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A running `gpuctl up` with all its children up; stopped (and its children killed) by PID afterwards."""
    process = gpuctl_up(tmp_path)
    seen: set[int] = set()
    try:
        def all_started() -> bool:
            assert process.poll() is None, f"gpuctl up exited: {process.stderr.read().decode() if process.stderr else ''}"
            seen.update(children_of(process.pid))
            return len(children_of(process.pid)) >= CHILDREN

        wait_for(all_started, 90, f"gpuctl up to start its {CHILDREN} children")
        yield process
    finally:
        seen.update(children_of(process.pid))
        process.kill()
        process.wait()
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


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
