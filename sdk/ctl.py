"""`gpuctl`: the operator's command line, a client of the platform like any other: it holds no service code.

`gpuctl up` runs the whole platform on one machine, each service its own program (`sdk.local`);
`gpuctl gateway|scheduler|projections|replay` run one service (`python -m <service>`).
`gpuctl keys create|list|revoke` and `gpuctl workers enroll|rotate|revoke` call the HTTP admin API
(`/api/v1/admin/...`) with the operator key the gateway wrote into the data dir at its first start.
`gpuctl events tail|show` and `gpuctl verify` read the streams as the `platform` user (`sdk.ctl_history`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, TypeVar

from cyclopts import App, Parameter, validators
from rich.console import Console
from rich.live import Live
from rich.table import Table

from sdk import ctl_history as history_commands
from sdk.api import ApiKeyRole, Token
from sdk.archive_cli import register as register_archive
from sdk.auth import API_KEY_ENV
from sdk.connection import redact
from sdk.errors import PlatformError
from sdk.http import HttpClient
from sdk.local import (
    DEFAULT_API_URL,
    OPERATOR_KEY_FILE,
    SECRETS_DIR,
    DataDirInUse,
    LocalStack,
    running_api_url,
)
from sdk.process import setup_logging

T = TypeVar("T")

logger = logging.getLogger("gpuctl")
console = Console(stderr=True)

app = App(name="gpuctl", help="Run and operate the gpu-fabric platform.")

Port = Annotated[int, Parameter(validator=validators.Number(gte=1, lte=65535))]
Count = Annotated[int, Parameter(validator=validators.Number(gte=1, lte=16))]
NatsUrl = Annotated[str | None, Parameter(env_var="NATS_URL", help="Use this NATS server instead of starting one.")]


# --- The services, each its own program ----------------------------------------------------------

#: `gpuctl <command> ARGS` runs `python -m <module> ARGS`: gpuctl holds no service code.
SERVICE_COMMANDS = {
    "gateway": ["gateway"],
    "scheduler": ["scheduler"],
    "projections": ["projections"],
    "replay": ["projections", "replay"],
    "retention": ["projections", "retention"],
}

PassThrough = Annotated[str, Parameter(allow_leading_hyphen=True)]


def _exec_service(command: str, args: Sequence[str]) -> None:
    """Become `python -m <service> ...` (same PID: signals and supervisors see the service itself)."""
    module, *sub = SERVICE_COMMANDS[command]
    os.execv(sys.executable, [sys.executable, "-m", module, *sub, *args])


@app.command
def gateway(*args: PassThrough) -> None:
    """Run the HTTP gateway and the `api.>` NATS endpoints: `python -m gateway` (flags: `gpuctl gateway --help`)."""
    _exec_service("gateway", args)


@app.command
def scheduler(*args: PassThrough) -> None:
    """Run a scheduler, leader or hot standby: `python -m scheduler` (flags: `gpuctl scheduler --help`)."""
    _exec_service("scheduler", args)


@app.command
def projections(*args: PassThrough) -> None:
    """Run the projections (read models, `proj.>`): `python -m projections` (flags: `gpuctl projections --help`)."""
    _exec_service("projections", args)


@app.command
def replay(*args: PassThrough) -> None:
    """Rebuild the read-model database from the streams: `python -m projections replay` (`--db`, `--until-seq`,
    `--until-time`)."""
    _exec_service("replay", args)


@app.command
def retention(*args: PassThrough) -> None:
    """Archive and purge jobs finished long ago: `python -m projections retention` (`--older-than-s`, `--out`)."""
    _exec_service("retention", args)


# --- gpuctl up -------------------------------------------------------------------------------------


@app.command
def up(
    *,
    data_dir: Path = Path(".data"),
    http_port: Port = 8000,
    nats_port: Port = 4222,
    worker: bool = True,
    nats_url: NatsUrl = None,
    cluster: Count = 1,
    replicas: Count | None = None,
    gateways: Count = 1,
    projections: Count = 1,
    schedulers: Count | None = None,
    leafnodes: bool = False,
    route_tls: bool = False,
) -> None:
    """Run the platform: NATS (unless NATS_URL is set), gateway, scheduler, projections and a local worker.

    Ctrl-C or SIGTERM stops every child it started and exits 0. A child that dies is restarted.

    Parameters
    ----------
    cluster
        Start this many NATS nodes routed to each other (client ports NATS_PORT, NATS_PORT+1, ...).
    replicas
        Copies of every stream and bucket (default: min(3, cluster)); existing ones with fewer are raised.
    gateways
        Gateway processes sharing HTTP_PORT (SO_REUSEPORT) and answering `api.>` in one queue group.
    projections
        Projections replicas, each with its own SQLite file, answering `proj.>` in one queue group.
    schedulers
        Scheduler processes, one leader and hot standbys (default: 2 with --cluster, else 1).
    leafnodes
        Every NATS node also listens for far regions' leaf servers (docs/deployment.md, "Far regions").
    route_tls
        The routes between the cluster's nodes are TLS, verified both ways against a local CA that is made
        in DATA_DIR/secrets/route-tls on first use (docs/deployment.md, "One machine, a cluster").
    """
    setup_logging("WARNING")
    if problem := _cluster_problem(cluster, replicas, nats_url, route_tls):
        console.print(f"[red]gpuctl: {problem}[/]")
        sys.exit(2)
    stack = LocalStack(
        data_dir, http_port=http_port, nats_port=nats_port, nats_url=nats_url, cluster=cluster, replicas=replicas,
        gateways=gateways, projections=projections, schedulers=schedulers, leafnodes=leafnodes, route_tls=route_tls,
    )
    stopping = threading.Event()  # set by a signal; wakes the loop below at once

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

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
        if stack.leafnode_urls:
            console.print(f"leaf servers of far regions connect to {','.join(stack.leafnode_urls)} as `leaf`")
        with Live(stack.table(), console=console, refresh_per_second=2) as live:
            while not stopping.is_set():
                stack.restart_crashed()
                live.update(stack.table())
                stopping.wait(0.5)
    finally:
        stack.stop()
        console.print("stopped every component")


def _cluster_problem(cluster: int, replicas: int | None, nats_url: str | None, route_tls: bool = False) -> str | None:
    """Why these `gpuctl up` options cannot run together, if they cannot."""
    if route_tls and cluster < 2:
        return "--route-tls secures the routes between the nodes of a cluster: add --cluster 3"
    if cluster > 1 and nats_url is not None:
        return "--cluster starts its own NATS nodes; unset NATS_URL (or drop --cluster to use that server)"
    if replicas is not None and nats_url is None and replicas > cluster:
        return f"--replicas {replicas} needs at least {replicas} NATS nodes (--cluster {replicas})"
    return None


# --- gpuctl keys / gpuctl workers: the platform's HTTP admin API, as its operator --------------------

keys = App(name="keys", help="API keys for clients and operators (shown once, stored as digests).")
workers = App(name="workers", help="Worker credentials: enrollment tokens, rotation, revocation.")
app.command(keys)
app.command(workers)
register_archive(app)  # gpuctl export / gpuctl import

DataDir = Annotated[
    Path, Parameter(help="The platform's data dir: the operator key in its `secrets/`, and the running `gpuctl up`.")
]
ApiUrl = Annotated[
    str | None,
    Parameter(env_var="GF_URL", help=f"The gateway (default: the `gpuctl up` running on the data dir, else {DEFAULT_API_URL})."),
]


def _as_operator(data_dir: Path, url: str | None, action: Callable[[HttpClient], Awaitable[T]]) -> T:
    """Run `action` through the HTTP admin API with the operator's key (`GF_API_KEY`, else the one the
    gateway wrote in `<data_dir>/secrets` at its first start); a refusal is a message and exit status 1."""
    setup_logging("WARNING")
    key_file = data_dir / SECRETS_DIR / OPERATOR_KEY_FILE
    api_key = os.environ.get(API_KEY_ENV) or (key_file.read_text(encoding="utf-8").strip() if key_file.exists() else None)
    if not api_key:
        console.print(f"[red]gpuctl: no operator key: set {API_KEY_ENV}, or run where {key_file} is[/]")
        sys.exit(1)
    base_url = url or running_api_url(data_dir) or DEFAULT_API_URL

    async def run() -> T:
        async with HttpClient(base_url, api_key=api_key) as http:
            return await action(http)

    try:
        return asyncio.run(run())
    except PlatformError as exc:
        console.print(f"[red]gpuctl: {exc.message} ({base_url})[/]")
        sys.exit(1)


@keys.command(name="create")
def create_key(name: str, /, *, role: ApiKeyRole = "client", data_dir: DataDir = Path(".data"), url: ApiUrl = None) -> None:
    """Create an API key named NAME and print it (once: only its digest is kept)."""
    created = _as_operator(data_dir, url, lambda http: http.create_api_key(name, role))
    console.print(f"created {created.role} key {created.key_id} ({created.name}); it is shown this once:")
    print(created.api_key)


@keys.command(name="list")
def list_keys(*, data_dir: DataDir = Path(".data"), url: ApiUrl = None) -> None:
    """List API keys (ids, names, roles; never the keys)."""
    items = _as_operator(data_dir, url, lambda http: http.list_api_keys())
    table = Table("key id", "name", "role", "created", "revoked")
    for key in items:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(key.created_at_ms / 1000))
        revoked = time.strftime("%Y-%m-%d %H:%M", time.localtime(key.revoked_at_ms / 1000)) if key.revoked_at_ms else ""
        table.add_row(key.key_id, key.name, key.role, created, revoked)
    Console().print(table)


@keys.command(name="revoke")
def revoke_key(key_id: str, /, *, data_dir: DataDir = Path(".data"), url: ApiUrl = None) -> None:
    """Revoke the API key KEY_ID, and every access token issued for it, at once."""
    _as_operator(data_dir, url, lambda http: http.revoke_api_key(key_id))
    console.print(f"revoked API key {key_id}")


@workers.command(name="enroll")
def enroll_worker(
    *,
    ttl_s: Annotated[float, Parameter(validator=validators.Number(gt=0))] = 3600.0,
    worker_id: Token | None = None,
    data_dir: DataDir = Path(".data"),
    url: ApiUrl = None,
) -> None:
    """Print a one-use enrollment token for `gpu-worker configure --enrollment-token` (valid TTL_S seconds;
    with --worker-id only that worker may use it, which re-enrolls a revoked worker)."""
    created = _as_operator(data_dir, url, lambda http: http.create_enrollment_token(ttl_s=ttl_s, worker_id=worker_id))
    console.print(
        f"enrollment token, one use, valid {ttl_s:.0f}s; the worker connects to NATS with it, no password "
        "(`gpu-worker configure --nats-url nats://<host>:4222 --enrollment-token <token>`):"
    )
    print(created.enrollment_token)


@workers.command(name="rotate")
def rotate_worker(worker_id: str, /, *, data_dir: DataDir = Path(".data"), url: ApiUrl = None) -> None:
    """Have WORKER_ID switch to new credentials at its next heartbeat."""
    _as_operator(data_dir, url, lambda http: http.rotate_worker(worker_id))
    console.print(f"worker {worker_id} rotates its credentials at its next heartbeat")


@workers.command(name="revoke")
def revoke_worker(worker_id: str, /, *, data_dir: DataDir = Path(".data"), url: ApiUrl = None) -> None:
    """Refuse WORKER_ID's requests from now on; the jobs it held are requeued."""
    _as_operator(data_dir, url, lambda http: http.revoke_worker(worker_id))
    console.print(f"revoked worker {worker_id}; its jobs are requeued")


@app.command
def status(*, data_dir: DataDir = Path(".data"), url: ApiUrl = None) -> None:
    """One screen: components, the scheduler leader, stream lags, workers by region, the queue (`sdk.status`)."""
    from sdk.status import gather, render

    Console().print(render(_as_operator(data_dir, url, gather)))


# --- gpuctl events / gpuctl verify: the log itself, as the `platform` user (`sdk.ctl_history`) -------

app.command(history_commands.events)
app.command(history_commands.verify)


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in SERVICE_COMMANDS:
        _exec_service(argv[0], argv[1:])  # the service parses its own flags, `--help` included
    app()


if __name__ == "__main__":
    main()
