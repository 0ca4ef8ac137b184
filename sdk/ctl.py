"""`gpuctl`: the operator's command line. `gpuctl up` runs the whole platform on one machine; each
component also runs on its own (`gpuctl gateway`, `gpuctl scheduler`, `gpuctl projections`).

Components are imported lazily, inside their commands: the SDK stays importable without them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from cyclopts import App, Parameter, validators
from rich.console import Console
from rich.live import Live
from rich.table import Table

from sdk.connection import nats_url_from_env

logger = logging.getLogger("gpuctl")
console = Console(stderr=True)

app = App(name="gpuctl", help="Run and operate the gpu-fabric platform.")

Port = Annotated[int, Parameter(validator=validators.Number(gte=1, lte=65535))]
NatsUrl = Annotated[str | None, Parameter(env_var="NATS_URL", help="Use this NATS server instead of starting one.")]


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_until_signal(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `serve(stop)` until SIGINT or SIGTERM sets `stop`; exit 0 after a clean stop."""
    _setup_logging()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    asyncio.run(main())


@app.command
def gateway(*, nats_url: NatsUrl = None, http_port: Port = 8000, host: str = "127.0.0.1") -> None:
    """Run the HTTP gateway and the `api.>` NATS endpoints."""
    from gateway.main import serve

    run_until_signal(lambda stop: serve(nats_url_from_env(nats_url), host, http_port, stop))


@app.command
def scheduler(*, nats_url: NatsUrl = None, instance_id: str | None = None) -> None:
    """Run a scheduler (the leader places jobs; another instance waits as a hot standby)."""
    from scheduler.service import serve

    run_until_signal(lambda stop: serve(nats_url_from_env(nats_url), stop, instance_id))


@app.command
def projections(*, nats_url: NatsUrl = None, db: Path = Path(".data/projections.db")) -> None:
    """Run the projections: SQLite read models and the `proj.>` query endpoints."""
    from projections.service import serve

    run_until_signal(lambda stop: serve(nats_url_from_env(nats_url), db, stop))


@app.command
def replay(
    *, nats_url: NatsUrl = None, db: Path = Path(".data/projections.db"), until_seq: int | None = None
) -> None:
    """Rebuild the read-model database from the streams (up to `--until-seq` for a past state)."""
    from projections.replay import rebuild

    _setup_logging()
    positions = asyncio.run(rebuild(nats_url_from_env(nats_url), db, until_seq))
    console.print(f"rebuilt [bold]{db}[/] at positions {positions}")


# --- gpuctl up -------------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    cmd: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, start_new_session=True
        )
        log.close()
        self.started_at = time.monotonic()
        logger.info("started %s (pid %s)", self.name, self.process.pid)

    @property
    def state(self) -> str:
        if self.process is None:
            return "not started"
        code = self.process.poll()
        return "running" if code is None else f"exited ({code})"

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _table(children: list[Child], http_port: int, nats_url: str) -> Table:
    table = Table(title=f"gpu-fabric  ·  API http://127.0.0.1:{http_port}/api/v1  ·  docs /schema  ·  NATS {nats_url}")
    for column in ("component", "pid", "state", "restarts", "log"):
        table.add_column(column)
    for child in children:
        style = "green" if child.state == "running" else "red"
        pid = str(child.process.pid) if child.process else "-"
        table.add_row(child.name, pid, f"[{style}]{child.state}[/]", str(child.restarts), str(child.log_path))
    return table


@app.command
def up(
    *,
    data_dir: Path = Path(".data"),
    http_port: Port = 8000,
    nats_port: Port = 4222,
    worker: bool = True,
    nats_url: NatsUrl = None,
) -> None:
    """Run the platform: NATS (unless NATS_URL is set), gateway, scheduler, projections and a local worker.

    Ctrl-C or SIGTERM stops every child it started and exits 0. A child that dies is restarted.
    """
    from sdk.broker import EmbeddedNats

    _setup_logging("WARNING")
    data_dir = data_dir.resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    broker = None
    if nats_url is None:
        broker = EmbeddedNats(data_dir / "nats", port=nats_port, log_file=logs / "nats-server.log")
        broker.start()
        nats_url = broker.url
    ctl = [sys.executable, "-m", "sdk.ctl"]
    children = [
        Child("gateway", [*ctl, "gateway", "--nats-url", nats_url, "--http-port", str(http_port)], logs / "gateway.log"),
        Child("scheduler", [*ctl, "scheduler", "--nats-url", nats_url], logs / "scheduler.log"),
        Child("projections", [*ctl, "projections", "--nats-url", nats_url, "--db", str(data_dir / "projections.db")],
              logs / "projections.log"),
    ]
    if worker:
        children.append(Child(
            "worker",
            [sys.executable, "-m", "worker", "start", "--nats-url", nats_url, "--name", "local", "--region", "local",
             "--state-dir", str(data_dir / "worker")],
            logs / "worker.log",
        ))
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for child in children:
            child.start()
        console.print(f"API  http://127.0.0.1:{http_port}/api/v1   docs http://127.0.0.1:{http_port}/schema")
        with Live(_table(children, http_port, nats_url), console=console, refresh_per_second=2) as live:
            while not stopping:
                for child in children:
                    # Restart a crashed child, but not in a tight loop.
                    if child.state != "running" and time.monotonic() - child.started_at > 2:
                        child.restarts += 1
                        child.start()
                live.update(_table(children, http_port, nats_url))
                time.sleep(0.5)
    finally:
        for child in reversed(children):
            child.stop()
        if broker is not None:
            broker.stop()
        console.print("stopped every component")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
