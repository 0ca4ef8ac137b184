"""`gpuctl`: the operator's command line. `gpuctl up` runs the whole platform on one machine; each
component also runs on its own (`gpuctl gateway`, `gpuctl scheduler`, `gpuctl projections`).

Components are imported lazily, inside their commands: the SDK stays importable without them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

from cyclopts import App, Parameter, validators
from rich.console import Console
from rich.live import Live

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
    from sdk.local import LocalStack

    _setup_logging("WARNING")
    stack = LocalStack(data_dir, http_port=http_port, nats_port=nats_port, nats_url=nats_url)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start(workers=["local"] if worker else [])
        console.print(f"API  {stack.http_url}/api/v1   docs {stack.http_url}/schema   NATS {stack.nats_url}")
        with Live(stack.table(), console=console, refresh_per_second=2) as live:
            while not stopping:
                stack.restart_crashed()
                live.update(stack.table())
                time.sleep(0.5)
    finally:
        stack.stop()
        console.print("stopped every component")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
