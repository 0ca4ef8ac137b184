"""Processes of the platform: a supervised child that dies with its supervisor, and a service's main loop.

A supervisor (`gpuctl up`, `LocalStack`, a test's broker) starts each child in a session of its own, so
Ctrl-C in a terminal reaches the supervisor only and it stops its children in order. A child must not
outlive its supervisor, whatever kills the supervisor (SIGKILL, the OOM killer):

- on Linux the kernel kills the child (`PR_SET_PDEATHSIG`, set between fork and exec, so it also holds
  for `nats-server`). It fires when the *thread* that spawned the child exits: spawn from a thread that
  lives as long as the supervisor (the main thread does);
- everywhere, a service run through `run_until_signal` also watches its parent (`GF_PARENT_PID`) and
  stops by itself once the parent is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import uvloop
from cyclopts import Parameter

from sdk.errors import PlatformError

logger = logging.getLogger(__name__)

#: The supervisor's PID, given to each child, which stops when its parent is no longer that process.
PARENT_PID_ENV = "GF_PARENT_PID"
#: How often a service looks whether its parent is still there.
PARENT_CHECK_INTERVAL_S = 1.0
#: The `--nats-url` flag of every service's command line.
NatsUrlFlag = Annotated[
    str | None,
    Parameter(env_var="NATS_URL", help="The NATS server, as the `platform` user (its URL holds the password: "
              "keep it in the environment)."),
]
#: Linux's prctl option: the signal the kernel sends to a process when its parent thread exits.
_PR_SET_PDEATHSIG = 1
#: libc, loaded here: loading a library between fork and exec may deadlock on a lock another thread held.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


def _die_with(parent_pid: int) -> Callable[[], None]:
    """A `preexec_fn`: ask the kernel for SIGKILL when the parent goes (Linux), and go at once if it is
    already gone (it may die between fork and prctl)."""

    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def spawn(cmd: list[str], *, env: dict[str, str] | None = None, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `cmd` in a session of its own, bound to this process's life; output to `log_path`."""
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with(os.getpid()),
            env={**os.environ, **(env or {}), PARENT_PID_ENV: str(os.getpid())},
        )
    finally:
        if log_path is not None:
            out.close()  # type: ignore[union-attr]


def terminate_all(processes: Iterable[subprocess.Popen[bytes]], timeout_s: float) -> list[subprocess.Popen[bytes]]:
    """SIGTERM to every running one at once, then SIGKILL to those still running after `timeout_s` (one
    deadline for all: they stop side by side). Returns the ones that were running."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("pid %s did not stop within %.0fs; killing it", process.pid, timeout_s)
            process.kill()
            process.wait()
    return running


class Child:
    """A program the supervisor runs, restarts when it dies, and stops by its PID."""

    #: How long `stop()` waits after SIGTERM before SIGKILL.
    stop_timeout_s = 10.0

    def __init__(self, name: str, cmd: list[str], log_path: Path | None = None, env: dict[str, str] | None = None):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.started_at = 0.0

    def command(self) -> list[str]:
        return self.cmd

    def start(self) -> None:
        self.process = spawn(self.command(), env=self.env, log_path=self.log_path)
        self.started_at = time.monotonic()
        logger.info("started %s (pid %s)", self.name, self.process.pid)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def state(self) -> str:
        if self.process is None:
            return "not started"
        code = self.process.poll()
        return "running" if code is None else f"exited ({code})"

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM, then SIGKILL after `timeout_s` (the child's `stop_timeout_s` by default)."""
        stop_all([self], timeout_s)

    def kill(self) -> None:
        """SIGKILL: the crash a child cannot clean up after."""
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait()


def stop_all(children: Iterable[Child], timeout_s: float | None = None) -> None:
    """Stop `children` side by side, each allowed its own `stop_timeout_s` (or `timeout_s`)."""
    children = [c for c in children if c.process is not None]
    if not children:
        return
    wait_s = timeout_s if timeout_s is not None else max(c.stop_timeout_s for c in children)
    stopped = terminate_all([c.process for c in children if c.process is not None], wait_s)
    for child in children:
        if child.process in stopped:
            logger.info("stopped %s (pid %s)", child.name, child.process.pid)


# --- A service's side ------------------------------------------------------------------------------


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def watch_parent(stop: asyncio.Event, interval_s: float = PARENT_CHECK_INTERVAL_S) -> None:
    """Set `stop` once the supervisor named in `GF_PARENT_PID` is no longer this process's parent."""
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected:
        return
    while not stop.is_set():
        if os.getppid() != int(expected):
            logger.warning("supervisor (pid %s) is gone; stopping", expected)
            stop.set()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


def exit_now(code: int) -> NoReturn:
    """Leave the process after a clean stop (everything closed and flushed by then) without the
    interpreter's teardown, which takes seconds with big libraries loaded (torch) while a supervisor's
    stop waits for it. Logs and output are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


T = TypeVar("T")


def run_service_loop(main: Awaitable[T]) -> T:
    """Run a service's main coroutine on uvloop: libuv's event loop costs a service less CPU per message
    than asyncio's own (measured in docs/benchmarks.md, "Against Celery and taskiq")."""
    return uvloop.run(main)  # type: ignore[arg-type]


def run_until_signal(serve: Callable[[asyncio.Event], Awaitable[None]]) -> NoReturn:
    """A service's main: run `serve(stop)` until SIGINT or SIGTERM sets `stop`, or the supervisor is gone;
    then exit the process at once (`exit_now`)."""
    setup_logging()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(watch_parent(stop))
        try:
            await serve(stop)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    try:
        run_service_loop(main())
    except PlatformError as exc:  # a setting that cannot work (a metrics port in use): one line, not a traceback
        logger.error("%s", exc.message)
        exit_now(1)
    exit_now(0)
