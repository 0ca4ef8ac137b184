"""`python -m projections`: the SQLite read models and the `proj.>` query endpoints, until SIGINT/SIGTERM
(or until the supervisor that started it is gone); `python -m projections replay` rebuilds the database
from the streams. `gpuctl up` runs the first as a child; `gpuctl projections` and `gpuctl replay` run them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cyclopts import App
from rich.console import Console

from projections.replay import rebuild
from projections.service import serve
from sdk.connection import nats_url_from_env
from sdk.process import NatsUrlFlag, run_until_signal, setup_logging

app = App(name="python -m projections", help="Run the projections (SQLite read models), or rebuild them.")


@app.default
def projections(*, nats_url: NatsUrlFlag = None, db: Path = Path(".data/projections.db")) -> None:
    """Run the projections: SQLite read models and the `proj.>` query endpoints."""
    run_until_signal(lambda stop: serve(nats_url_from_env(nats_url), db, stop))


@app.command
def replay(*, nats_url: NatsUrlFlag = None, db: Path = Path(".data/projections.db"), until_seq: int | None = None) -> None:
    """Rebuild the read-model database from the streams (up to `--until-seq` for a past state)."""
    setup_logging()
    positions = asyncio.run(rebuild(nats_url_from_env(nats_url), db, until_seq))
    Console(stderr=True).print(f"rebuilt [bold]{db}[/] at positions {positions}")


if __name__ == "__main__":
    app()
