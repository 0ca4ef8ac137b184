"""The CPU accounting of the benchmarks (`bench.procstat`), on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bench.procstat import cpu_s, descendants, tree_cpu_s

BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(30)"


def test_a_child_that_burns_cpu_is_counted_under_its_parent() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {BURN!r}])\ntime.sleep(30)"]
    )
    try:
        deadline = time.monotonic() + 20
        while not (children := descendants(parent.pid)) or cpu_s(children[0]) < 0.25:
            assert time.monotonic() < deadline, "the child never burned its 0.3 s"
            time.sleep(0.1)
        assert len(children) == 1
        assert cpu_s(parent.pid) < 0.25  # the parent only sleeps
        assert tree_cpu_s(parent.pid) >= cpu_s(children[0]) >= 0.25
    finally:
        for pid in descendants(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_a_gone_process_costs_nothing() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert cpu_s(gone.pid) == 0.0
    assert descendants(gone.pid) == []
