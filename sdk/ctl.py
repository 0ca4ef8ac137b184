"""`gpuctl`: the operator's command line. `gpuctl up` runs the whole platform on one machine; each
component also runs on its own (`gpuctl gateway`, `gpuctl scheduler`, `gpuctl projections`).
`gpuctl keys create|list|revoke` and `gpuctl workers enroll|rotate|revoke` manage credentials straight
from the data dir (the master key and the platform's NATS password), with no gateway in between.

Components are imported lazily, inside their commands: the SDK stays importable without them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

from cyclopts import App, Parameter, validators
from rich.console import Console
from rich.live import Live
from rich.table import Table

from sdk.api import ApiKeyRole, CreateApiKey, CreateEnrollment, Token
from sdk.connection import nats_url_from_env, redact
from sdk.errors import PlatformError
from sdk.process import run_until_signal, setup_logging

if TYPE_CHECKING:
    from gateway.admin import Admin

T = TypeVar("T")

logger = logging.getLogger("gpuctl")
console = Console(stderr=True)

app = App(name="gpuctl", help="Run and operate the gpu-fabric platform.")

Port = Annotated[int, Parameter(validator=validators.Number(gte=1, lte=65535))]
NatsUrl = Annotated[str | None, Parameter(env_var="NATS_URL", help="Use this NATS server instead of starting one.")]
PlatformNats = Annotated[
    str | None,
    Parameter(
        env_var="NATS_URL", help="The platform's NATS server (default: 127.0.0.1:NATS_PORT, where `gpuctl up` runs it)."
    ),
]
DataDir = Annotated[
    Path, Parameter(help="The platform's data dir (its `secrets/` hold the master key and NATS passwords).")
]


@app.command
def gateway(
    *,
    nats_url: NatsUrl = None,
    http_port: Port = 8000,
    host: str = "127.0.0.1",
    secrets_dir: Annotated[Path, Parameter(env_var="GF_SECRETS_DIR")] = Path(".data/secrets"),
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    access_ttl_s: Annotated[float, Parameter(validator=validators.Number(gt=0))] = 900.0,
    worker_credentials_max_age_s: Annotated[float, Parameter(validator=validators.Number(gt=0))] = 86400.0,
) -> None:
    """Run the HTTP gateway and the `api.>` NATS endpoints.

    Parameters
    ----------
    secrets_dir
        Where the master key lives (created there, mode 0600, on first run).
    tls_cert
        Serve HTTPS with this certificate (PEM); `tls_key` is its private key.
    access_ttl_s
        How long an access token is valid.
    worker_credentials_max_age_s
        Workers rotate credentials older than this (they are told at a heartbeat).
    """
    from gateway.auth import AuthSettings
    from gateway.main import serve

    settings = AuthSettings(access_ttl_s=access_ttl_s, worker_credentials_max_age_s=worker_credentials_max_age_s)
    run_until_signal(
        lambda stop: serve(
            nats_url_from_env(nats_url), host, http_port, stop,
            secrets_dir=secrets_dir, settings=settings, tls_cert=tls_cert, tls_key=tls_key,
        )
    )


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

    setup_logging()
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
    from sdk.local import DataDirInUse, LocalStack

    setup_logging("WARNING")
    stack = LocalStack(data_dir, http_port=http_port, nats_port=nats_port, nats_url=nats_url)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start(workers=["local"] if worker else [])
    except DataDirInUse as exc:
        console.print(f"[red]gpuctl: {exc}[/]")
        sys.exit(1)
    except BaseException:
        stack.stop()
        raise
    try:
        console.print(f"API  {stack.http_url}/api/v1   docs {stack.http_url}/schema   NATS {redact(stack.nats_url)}")
        console.print(
            f"operator API key in {stack.operator_key_file} (export GF_API_KEY=$(cat {stack.operator_key_file})); "
            f"NATS passwords in {stack.secrets_dir / 'nats.env'}"
        )
        with Live(stack.table(), console=console, refresh_per_second=2) as live:
            while not stopping:
                stack.restart_crashed()
                live.update(stack.table())
                time.sleep(0.5)
    finally:
        stack.stop()
        console.print("stopped every component")


# --- gpuctl keys / gpuctl workers: credentials, from the data dir ----------------------------------

keys = App(name="keys", help="API keys for clients and operators (shown once, stored as digests).")
workers = App(name="workers", help="Worker credentials: enrollment tokens, rotation, revocation.")
app.command(keys)
app.command(workers)


def _with_admin(data_dir: Path, nats_url: str | None, nats_port: int, action: Callable[[Admin], Awaitable[T]]) -> T:
    """Run `action` as the platform user against the NATS server (the one `gpuctl up` runs, by default),
    with the master key from `<data_dir>/secrets`; a refusal is a message and exit status 1."""
    from gateway.admin import open_admin
    from sdk.local import SECRETS_DIR, platform_url

    setup_logging("WARNING")
    url = platform_url(data_dir, nats_url or f"nats://127.0.0.1:{nats_port}")

    async def run() -> T:
        async with open_admin(url, data_dir / SECRETS_DIR) as admin:
            return await action(admin)

    try:
        return asyncio.run(run())
    except PlatformError as exc:
        console.print(f"[red]gpuctl: {exc.message}[/]")
        sys.exit(1)


@keys.command(name="create")
def create_key(
    name: str, /, *, role: ApiKeyRole = "client", data_dir: DataDir = Path(".data"), nats_url: PlatformNats = None,
    nats_port: Port = 4222,
) -> None:
    """Create an API key named NAME and print it (once: only its digest is kept)."""
    created = _with_admin(data_dir, nats_url, nats_port, lambda a: a.create_api_key(CreateApiKey(name=name, role=role)))
    console.print(f"created {created.role} key {created.key_id} ({created.name}); it is shown this once:")
    print(created.api_key)


@keys.command(name="list")
def list_keys(*, data_dir: DataDir = Path(".data"), nats_url: PlatformNats = None, nats_port: Port = 4222) -> None:
    """List API keys (ids, names, roles; never the keys)."""
    page = _with_admin(data_dir, nats_url, nats_port, lambda a: a.list_api_keys())
    table = Table("key id", "name", "role", "created", "revoked")
    for key in page.items:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(key.created_at_ms / 1000))
        revoked = time.strftime("%Y-%m-%d %H:%M", time.localtime(key.revoked_at_ms / 1000)) if key.revoked_at_ms else ""
        table.add_row(key.key_id, key.name, key.role, created, revoked)
    Console().print(table)


@keys.command(name="revoke")
def revoke_key(
    key_id: str, /, *, data_dir: DataDir = Path(".data"), nats_url: PlatformNats = None, nats_port: Port = 4222
) -> None:
    """Revoke the API key KEY_ID, and every access token issued for it, at once."""
    _with_admin(data_dir, nats_url, nats_port, lambda a: a.revoke_api_key(key_id))
    console.print(f"revoked API key {key_id}")


@workers.command(name="enroll")
def enroll_worker(
    *,
    ttl_s: Annotated[float, Parameter(validator=validators.Number(gt=0))] = 3600.0,
    worker_id: Token | None = None,
    data_dir: DataDir = Path(".data"),
    nats_url: PlatformNats = None,
    nats_port: Port = 4222,
) -> None:
    """Print a one-use enrollment token for `gpu-worker configure --enrollment-token` (valid TTL_S seconds;
    with --worker-id only that worker may use it, which re-enrolls a revoked worker)."""
    request = CreateEnrollment(ttl_s=ttl_s, worker_id=worker_id)
    created = _with_admin(data_dir, nats_url, nats_port, lambda a: a.create_enrollment(request))
    console.print(
        f"enrollment token, one use, valid {ttl_s:.0f}s; the worker connects to NATS as user `worker` "
        f"(password: GF_WORKER_PASSWORD in {data_dir / 'secrets' / 'nats.env'}):"
    )
    print(created.enrollment_token)


@workers.command(name="rotate")
def rotate_worker(
    worker_id: str, /, *, data_dir: DataDir = Path(".data"), nats_url: PlatformNats = None, nats_port: Port = 4222
) -> None:
    """Have WORKER_ID switch to new credentials at its next heartbeat."""
    _with_admin(data_dir, nats_url, nats_port, lambda a: a.request_rotation(worker_id))
    console.print(f"worker {worker_id} rotates its credentials at its next heartbeat")


@workers.command(name="revoke")
def revoke_worker(
    worker_id: str, /, *, data_dir: DataDir = Path(".data"), nats_url: PlatformNats = None, nats_port: Port = 4222
) -> None:
    """Refuse WORKER_ID's requests from now on; the jobs it held are requeued."""
    _with_admin(data_dir, nats_url, nats_port, lambda a: a.revoke_worker(worker_id))
    console.print(f"revoked worker {worker_id}; its jobs are requeued")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
