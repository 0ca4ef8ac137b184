"""The platform on one machine: a real nats-server plus each component as a child process.

`gpuctl up` runs it for people; the end-to-end tests and the benchmarks run the same thing, so what
they measure is what a user starts. Every child is stopped by its PID.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from sdk.broker import EmbeddedNats, free_port

logger = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                start_new_session=True,  # Ctrl-C in the terminal reaches gpuctl only; it stops children in order
            )
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

    def stop(self, timeout_s: float = 45.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s` (longer than a worker's drain, 30 s by default)."""
        if not self.running:
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        logger.info("stopped %s (pid %s)", self.name, self.process.pid)

    def kill(self) -> None:
        """SIGKILL: the crash a worker cannot clean up after."""
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait()


class LocalStack:
    def __init__(
        self,
        data_dir: Path,
        *,
        http_port: int | None = None,
        nats_port: int | None = None,
        nats_url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.logs = self.data_dir / "logs"
        self.http_port = http_port or free_port()
        self.env = env or {}
        self.broker = None if nats_url else EmbeddedNats(
            self.data_dir / "nats", port=nats_port, log_file=self.logs / "nats-server.log"
        )
        self.nats_url = nats_url or self.broker.url  # type: ignore[union-attr]
        self.children: dict[str, Child] = {}

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _child(
        self, name: str, args: list[str], module: str = "sdk.ctl", env: dict[str, str] | None = None
    ) -> Child:
        child = Child(
            name, [sys.executable, "-m", module, *args], self.logs / f"{name}.log", env={**self.env, **(env or {})}
        )
        self.children[name] = child
        child.start()
        return child

    def start(self, workers: list[str] = ()) -> None:  # type: ignore[assignment]
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.broker is not None:
            self.broker.start()
        url = ["--nats-url", self.nats_url]
        self._child("gateway", ["gateway", *url, "--http-port", str(self.http_port)])
        self._child("scheduler", ["scheduler", *url])
        self._child("projections", ["projections", *url, "--db", str(self.data_dir / "projections.db")])
        for name in workers:
            self.start_worker(name)

    def start_worker(
        self, name: str, region: str = "local", *extra: str, env: dict[str, str] | None = None
    ) -> Child:
        """A `gpu-worker start` child; `extra` are more flags, `env` e.g. `GPU_WORKER_*` settings."""
        args = ["start", "--nats-url", self.nats_url, "--name", name, "--region", region,
                "--state-dir", str(self.data_dir / "workers" / name), *extra]
        return self._child(f"worker-{name}" if name != "local" else "worker", args, module="worker", env=env)

    def restart_crashed(self, after_s: float = 2.0) -> None:
        for child in self.children.values():
            if not child.running and time.monotonic() - child.started_at > after_s:
                child.restarts += 1
                child.start()

    def stop(self) -> None:
        # Workers first (they finish or hand back their jobs), then the services, then the broker.
        for child in sorted(self.children.values(), key=lambda c: not c.name.startswith("worker")):
            child.stop()
        if self.broker is not None:
            self.broker.stop()

    def table(self) -> Table:
        table = Table(title=f"gpu-fabric  ·  {self.http_url}/api/v1  ·  docs /schema  ·  {self.nats_url}")
        for column in ("component", "pid", "state", "restarts", "log"):
            table.add_column(column)
        for child in self.children.values():
            style = "green" if child.running else "red"
            pid = str(child.process.pid) if child.process else "-"
            table.add_row(child.name, pid, f"[{style}]{child.state}[/]", str(child.restarts), str(child.log_path))
        return table
