"""`gpuctl export` and `gpuctl import`: the whole log to a file and back (`sdk.archive`).

Both talk NATS directly as the `platform` user, as the services do: there is no HTTP route for a log of
millions of messages. The URL and credentials are found as for `gpuctl events` (`sdk.ctl_history.platform_url`:
`--nats-url` / `NATS_URL`, else `nats://127.0.0.1:4222`, with the platform password from the data dir's
`secrets/nats.env` when the URL names no user). When no URL is given and no `gpuctl up` runs on the data dir, gpuctl starts the data dir's own
nats-server for the command and stops it after: a stopped platform can be backed up, and a new data dir
filled, without starting any service (services must not write while an import runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, TypeVar

from cyclopts import App, Parameter
from nats.js import JetStreamContext
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sdk.archive import export_header, export_log, import_log, read_header, refuse_unless_empty
from sdk.broker import EmbeddedNats, free_port
from sdk.connection import DEFAULT_NATS_URL, connect, redact
from sdk.ctl_history import CliError, platform_url
from sdk.errors import PlatformError
from sdk.local import SECRETS_DIR, running_api_url
from sdk.process import setup_logging

T = TypeVar("T")

logger = logging.getLogger(__name__)
console = Console(stderr=True)

DataDir = Annotated[Path, Parameter(help="The platform's data dir: its `secrets/` (the NATS password), its `nats/` store.")]
NatsUrl = Annotated[
    str | None, Parameter(env_var="NATS_URL", help=f"The platform's NATS (default: the data dir's, or {DEFAULT_NATS_URL}).")
]


@contextlib.contextmanager
def platform_nats(data_dir: Path, nats_url: str | None) -> Iterator[str]:
    """The URL to use, starting the data dir's nats-server for the command when nothing else is given."""
    if nats_url or running_api_url(data_dir):
        yield platform_url(data_dir, nats_url)
        return
    server = EmbeddedNats(
        data_dir / "nats", port=free_port(), secrets_dir=data_dir / SECRETS_DIR, log_file=data_dir / "logs" / "nats-export.log"
    )
    server.start()
    console.print(f"started the data dir's nats-server for this command ({server.address}, store {server.store_dir})")
    try:
        yield server.url
    finally:
        server.stop()


def _run(data_dir: Path, nats_url: str | None, action: Callable[[JetStreamContext, str], Awaitable[T]]) -> T:
    """Run `action` on the platform's JetStream; a refusal or an unreachable server is a message and exit 1."""
    setup_logging("WARNING")

    async def run(url: str) -> T:
        nc = await connect(url, name="gpuctl-archive", wait_s=10)
        try:
            return await action(nc.jetstream(), url)
        finally:
            await nc.close()

    try:
        with platform_nats(data_dir, nats_url) as url:
            return asyncio.run(run(url))
    except PlatformError as exc:
        console.print(f"[red]gpuctl: {exc.message}[/]")
    except CliError as exc:
        console.print(f"[red]gpuctl: {exc}[/]")
    except OSError as exc:
        console.print(f"[red]gpuctl: cannot reach NATS ({redact(nats_url or DEFAULT_NATS_URL)}): {exc}[/]")
    sys.exit(1)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    )


def export(*, out: Path, data_dir: DataDir = Path(".data"), nats_url: NatsUrl = None) -> None:
    """Write every stream and bucket (messages, subjects, headers, sequences, timestamps) to OUT as
    gzip-compressed JSON lines: the backup, and the way to move a platform (`gpuctl import`)."""

    async def run(js: JetStreamContext, url: str) -> None:
        header = await export_header(js)
        with _progress() as bar:
            task = bar.add_task("export", total=sum(s.messages for s in header.streams))
            done = await export_log(js, out, lambda stream, n: bar.update(task, advance=n, description=stream), header)
        console.print(f"exported {len(done.streams)} streams and buckets to {out} ({out.stat().st_size:,} bytes)")

    _run(data_dir, nats_url, run)


def import_(file: Path, /, *, data_dir: DataDir = Path(".data"), nats_url: NatsUrl = None) -> None:
    """Load an export FILE into an empty platform (no events yet), keeping each stream's order, sequence
    numbers and message ids. Run it before the services start (`gpuctl up` after it)."""
    if not file.is_file():
        console.print(f"[red]gpuctl: no such file: {file}[/]")
        sys.exit(1)

    async def run(js: JetStreamContext, url: str) -> None:
        header = read_header(file)
        await refuse_unless_empty(js, header)  # before the progress bar: a refusal is one line
        with _progress() as bar:
            task = bar.add_task("import", total=sum(s.messages for s in header.streams))
            counts = await import_log(js, file, lambda stream, n: bar.update(task, advance=n, description=stream))
        console.print(f"imported {sum(counts.values()):,} messages into {len(counts)} streams and buckets")

    _run(data_dir, nats_url, run)


def register(app: App) -> None:
    app.command(export, name="export")
    app.command(import_, name="import")
