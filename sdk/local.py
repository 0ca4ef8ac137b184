"""The platform on one machine: a real nats-server plus each service as its own program, a child process
(`python -m gateway`, `python -m scheduler`, `python -m projections`, `python -m worker start`): nothing here
imports a service.

`gpuctl up` runs it for people; the end-to-end tests and the benchmarks run the same thing, so what
they measure is what a user starts. Every child is stopped by its PID.

The data dir keeps the secrets of the installation in `secrets/` (mode 0700, files 0600), created on
first run and reused after:

| file            | what                                                                     |
| --------------- | ------------------------------------------------------------------------ |
| `nats.env`      | the NATS users' passwords (`GF_PLATFORM_PASSWORD=...`) and the auth callout's issuer, for nats-server |
| `nats-issuer.seed` | the auth callout's signing key (the gateway's; `sdk.broker`)          |
| `master.key`    | the gateway's master key (every token MAC and worker secret derives from it) |
| `operator.key`  | an operator API key, made by the gateway at its first start for the person running it |

Operator actions (enrollment tokens for the workers it starts) go through the HTTP admin API with that key.

Children get their NATS URL, credentials included, through the environment (`NATS_URL`), never on
the command line: services as the `platform` user; workers and clients connect with their own
identity (`sdk.bus`), so their URL carries no password.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import psutil
from nats.aio.client import Client as NatsClient
from nats.js.errors import KeyNotFoundError, NotFoundError
from rich.table import Table

from sdk import subjects
from sdk.broker import CLUSTER_READY_S, EmbeddedNats, NatsCluster, free_port, wait_for_jetstream
from sdk.connection import connect, redact
from sdk.http import HttpClient
from sdk.log import REPLICAS_ENV, ensure_streams
from sdk.migrate import move_streams
from sdk.process import Child, stop_all

logger = logging.getLogger(__name__)

T = TypeVar("T")

SECRETS_DIR = "secrets"
OPERATOR_KEY_FILE = "operator.key"
#: A single server's store (`gpuctl up` without --cluster).
SINGLE_STORE_DIR = "nats"
#: Where the nodes of a local cluster keep their stores (`<data_dir>/nats-cluster/gf-1`, ...); never
#: `<data_dir>/nats`, a single server's store, which a cluster node would delete as orphaned streams.
CLUSTER_STORE_DIR = "nats-cluster"
#: Held by the stack that runs on a data dir (`DataDirLock`).
LOCK_FILE = "gpuctl.lock"
DEFAULT_API_URL = "http://127.0.0.1:8000"
#: How long `start()` waits for the gateway to answer (its first start makes the master and operator keys).
GATEWAY_START_S = 60.0
#: A worker finishes or hands back its jobs when stopped (its drain, 30 s by default): wait a bit longer.
WORKER_STOP_TIMEOUT_S = 45.0
#: Where `gpu-worker start` keeps its credentials in its state dir (`worker.config.LocalConfig`).
WORKER_CREDENTIALS_FILE = "credentials.json"


class DataDirInUse(RuntimeError):
    """Another stack runs on this data dir; the message names its PID."""


class DataDirLock:
    """An exclusive `flock` on `<data_dir>/gpuctl.lock` while a stack runs there, so that a second one
    refuses at once instead of fighting over the store and the ports. The file names the holder (its PID,
    its API's URL). The kernel drops the lock when the holder dies, however it dies: a file left behind
    never blocks the next start."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self, http_url: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = _holder(file.read())
            file.close()
            raise DataDirInUse(
                f"{self.path.parent} is in use by another gpuctl up (pid {holder.get('pid', '?')}); "
                "stop that one first, or pass another --data-dir"
            ) from None
        file.truncate(0)
        file.write(json.dumps({"pid": os.getpid(), "http_url": http_url}))
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None


def running_api_url(data_dir: Path) -> str | None:
    """The API URL of the stack running on `data_dir` now, if one does."""
    path = Path(data_dir) / LOCK_FILE
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            url = _holder(file.read()).get("http_url")
            return url if isinstance(url, str) else None
    return None  # nobody holds it: what the file says is from a stack that is gone


def _holder(text: str) -> dict[str, object]:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


class LocalStack:
    def __init__(
        self,
        data_dir: Path,
        *,
        http_port: int | None = None,
        nats_port: int | None = None,
        nats_url: str | None = None,
        env: dict[str, str] | None = None,
        cluster: int = 1,
        replicas: int | None = None,
        gateways: int = 1,
        projections: int = 1,
        schedulers: int | None = None,
        leafnodes: bool = False,
        route_tls: bool = False,
    ) -> None:
        """With `nats_url` (credentials included) the stack uses that server for every component
        instead of starting one. `cluster` > 1 starts that many NATS nodes routed to each other (client
        ports `nats_port`, `nats_port + 1`, ...) and gives every process all their URLs. Every stream and
        bucket gets `replicas` copies (default: min(3, nodes)). `gateways` processes share the HTTP port,
        `projections` replicas each keep a database of their own, and `schedulers` (default 2 on a
        cluster, else 1) elect one leader; the first of each is named as on one node (`gateway`), the
        others `gateway-2`, ... (`replicas_of`). With `leafnodes` every NATS node also listens for far
        regions' leaf servers (`leafnode_urls`, `sdk.broker.LeafNats`). With `route_tls` the routes between
        the nodes are TLS, verified both ways against a local CA in `secrets/route-tls/`."""
        self.data_dir = Path(data_dir).resolve()
        self.logs = self.data_dir / "logs"
        self.secrets_dir = self.data_dir / SECRETS_DIR
        self.http_port = http_port or free_port()
        self.replicas = replicas or min(3, cluster)
        self.counts = {"gateway": gateways, "projections": projections, "scheduler": schedulers or (2 if cluster > 1 else 1)}
        self.env = env or {}
        #: The NATS servers this stack runs (none with `nats_url`); `broker` is the first.
        self.brokers: list[EmbeddedNats] = []
        if nats_url is not None:
            self.platform_url = self.worker_url = self.client_url = nats_url
        elif cluster > 1:
            nodes = NatsCluster(
                self.data_dir / CLUSTER_STORE_DIR, cluster, port=nats_port, secrets_dir=self.secrets_dir, log_dir=self.logs,
                leafnodes=leafnodes, route_tls=route_tls,
            )
            self.brokers = nodes.nodes
            self.platform_url = nodes.url_as("platform")
            self.worker_url = self.client_url = nodes.address
        else:
            broker = EmbeddedNats(
                self.data_dir / SINGLE_STORE_DIR, port=nats_port, secrets_dir=self.secrets_dir,
                log_file=self.logs / "nats-server.log", leafnode_port=free_port() if leafnodes else None,
            )
            self.brokers = [broker]
            self.platform_url = broker.url_as("platform")
            # Workers and clients bring their own identity (`sdk.bus`): their URL carries no password.
            self.worker_url = self.client_url = broker.address
        #: An operator API key (from `secrets/operator.key`, created on the first start).
        self.operator_key: str | None = None
        #: Every process of the stack, brokers first: started, restarted and shown in this order.
        self.children: dict[str, Child] = {}
        self.lock = DataDirLock(self.data_dir)

    @property
    def broker(self) -> EmbeddedNats | None:
        """The (first) NATS server this stack runs; None when it uses a server given by URL."""
        return self.brokers[0] if self.brokers else None

    @property
    def leafnode_urls(self) -> list[str]:
        """Where a far region's leaf server connects (`nats://host:port` of each node's leafnode listener)."""
        return [f"nats://127.0.0.1:{b.leafnode_port}" for b in self.brokers if b.leafnode_port is not None]

    def replicas_of(self, service: str) -> list[Child]:
        """The running processes of `service` (`gateway`, `projections`, `scheduler`, `nats-server`,
        `worker`), by their PIDs in `child.process.pid`: what a test kills."""
        return [c for name, c in self.children.items() if name == service or name.startswith(f"{service}-")]

    @property
    def nats_url(self) -> str:
        """The platform user's URL (what services and operator tools connect with)."""
        return self.platform_url

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def operator_key_file(self) -> Path:
        return self.secrets_dir / OPERATOR_KEY_FILE

    def _child(self, name: str, args: list[str], module: str, env: dict[str, str] | None = None) -> Child:
        """`python -m <module> <args>`, logging to `logs/<name>.log`, started now."""
        cmd = [sys.executable, "-m", module, *args]
        child = Child(name, cmd, self.logs / f"{name}.log", env={**self.env, **(env or {})})
        self.children[name] = child
        child.start()
        return child

    def service(self, name: str, args: list[str]) -> Child:
        """A service named `name` (a second scheduler: `service("scheduler-2", ["scheduler"])`): `args` are
        its package and flags, run as `python -m <package> <flags>` and connected as the platform user."""
        module, *flags = args
        return self._child(name, flags, module=module, env={"NATS_URL": self.platform_url, REPLICAS_ENV: str(self.replicas)})

    def start(self, workers: list[str] = ()) -> None:  # type: ignore[assignment]
        """Start the broker (unless given a server), the services and `workers`; return once the gateway
        answers. Refuses at once (`DataDirInUse`) when another stack holds the data dir. Spawn children
        from a thread that lives as long as the stack (they die with the thread that started them,
        `sdk.process`)."""
        self.lock.acquire(self.http_url)
        self.logs.mkdir(parents=True, exist_ok=True)
        for broker in self.brokers:
            self.children[broker.name] = broker
            broker.start()
        if len(self.brokers) > 1:
            self._run(self._cluster_ready())
        gateway_flags = ["--http-port", str(self.http_port), "--secrets-dir", str(self.secrets_dir)]
        if self.counts["gateway"] > 1:
            gateway_flags.append("--reuse-port")  # one port, the kernel spreads connections over them
        for name in _replica_names("gateway", self.counts["gateway"]):
            self.service(name, ["gateway", *gateway_flags])
        for name in _replica_names("scheduler", self.counts["scheduler"]):
            # Its name is its id in the leader lease, so `leader()` finds the process that leads.
            self.service(name, ["scheduler", "--instance-id", name])
        for name in _replica_names("projections", self.counts["projections"]):
            self.service(name, ["projections", "--db", str(self.data_dir / f"{name}.db")])
        self.operator_key = self._wait_for_gateway()
        for name in workers:
            self.start_worker(name)

    def start_worker(
        self, name: str, region: str = "local", *extra: str, env: dict[str, str] | None = None
    ) -> Child:
        """A `gpu-worker start` child; `extra` are more flags, `env` e.g. `GPU_WORKER_*` settings. A worker
        without credentials in its state dir gets a new enrollment token."""
        state_dir = self.data_dir / "workers" / name
        worker_env = {"NATS_URL": self.worker_url}
        if not (state_dir / WORKER_CREDENTIALS_FILE).exists():
            worker_env["GPU_WORKER_ENROLLMENT_TOKEN"] = self.create_enrollment_token()
        args = ["start", "--name", name, "--region", region, "--state-dir", str(state_dir), *extra]
        child_name = f"worker-{name}" if name != "local" else "worker"
        child = self._child(child_name, args, module="worker", env={**worker_env, **(env or {})})
        child.stop_timeout_s = WORKER_STOP_TIMEOUT_S
        return child

    def _wait_for_gateway(self, timeout_s: float = GATEWAY_START_S) -> str:
        """The operator key the gateway wrote at its first start, once every gateway listens and one answers."""
        deadline = time.monotonic() + timeout_s
        while True:
            gateways = self.replicas_of("gateway")
            if self.operator_key_file.exists() and _healthy(self.http_url) and all(map(_listening, gateways)):
                return self.operator_key_file.read_text(encoding="utf-8").strip()
            for gateway in gateways:
                if not gateway.running or time.monotonic() > deadline:
                    raise RuntimeError(f"{gateway.name} did not come up ({gateway.state}; see {gateway.log_path})")
            time.sleep(0.1)

    async def _cluster_ready(self) -> None:
        """Every stream and bucket, with their replicas, before the services start: they would race to
        make them, and a stream made by an older version on one node gets its replicas here. The first
        cluster on a data dir that a single server used takes over that server's streams (`sdk.migrate`)."""
        await wait_for_jetstream(self.platform_url, CLUSTER_READY_S, self.replicas)
        nc = await connect(self.platform_url, name="gpuctl")
        try:
            single_store = self.data_dir / SINGLE_STORE_DIR
            if (single_store / "jetstream").is_dir() and not await _has_stream(nc, subjects.JOBS_STREAM):
                await self._move_single_node_streams(single_store, nc)
            await ensure_streams(nc.jetstream(), self.replicas)
        finally:
            await nc.close()

    async def _move_single_node_streams(self, store: Path, cluster: NatsClient) -> None:
        """Run the single server on its old store (on a port of its own, for this only) and move its
        streams into the cluster; the old store is left as it was."""
        single = EmbeddedNats(store, secrets_dir=self.secrets_dir, log_file=self.logs / "nats-single-node.log")
        single.start()
        try:
            source = await connect(single.url, name="gpuctl-migrate")
            try:
                moved = await move_streams(source, cluster, self.replicas)
            finally:
                await source.close()
        finally:
            single.stop()
        logger.warning("moved %s from the single server's store %s into the cluster (%d replicas); that store "
                       "is no longer used: delete it once the cluster has what you expect", ", ".join(moved) or "nothing",
                       store, self.replicas)

    async def leader(self) -> Child | None:
        """The scheduler process that holds the leader lease now (None while none does)."""
        nc = await connect(self.platform_url, name="gpuctl")
        try:
            kv = await nc.jetstream().key_value(subjects.SCHEDULER_LEASE_BUCKET)
            try:
                entry = await kv.get(subjects.SCHEDULER_LEASE_KEY)
            except KeyNotFoundError:
                return None
            return self.children.get((entry.value or b"").decode())
        finally:
            await nc.close()

    # --- Operator actions, through the HTTP admin API like any client's ----------------------------

    def create_enrollment_token(self, worker_id: str | None = None, ttl_s: float = 3600.0) -> str:
        """A one-use enrollment token (blocking)."""
        created = self._as_operator(lambda http: http.create_enrollment_token(ttl_s=ttl_s, worker_id=worker_id))
        return created.enrollment_token

    def _as_operator(self, action: Callable[[HttpClient], Awaitable[T]]) -> T:
        """Run an admin call to completion from sync code."""

        async def run() -> T:
            async with HttpClient(self.http_url, api_key=self.operator_key) as http:
                return await action(http)

        return self._run(run())

    @staticmethod
    def _run(work: Coroutine[Any, Any, T]) -> T:
        """Run `work` to completion from sync code, also when an event loop is running here (a test's): on a
        thread of its own, with a loop of its own."""
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, work).result()

    def restart_crashed(self, after_s: float = 2.0) -> None:
        """Start again each child that died (the broker first, on its store), `after_s` after its last start."""
        for child in self.children.values():
            if not child.running and time.monotonic() - child.started_at > after_s:
                child.restarts += 1
                logger.warning("%s exited (%s); restarting it", child.name, child.state)
                try:
                    child.start()
                except (OSError, RuntimeError) as exc:
                    logger.error("%s did not start again (%s); retrying", child.name, exc)

    def stop(self) -> None:
        """Workers first (they finish or hand back their jobs: the only long wait), then the services side
        by side, then the broker, then the data dir is free again."""
        workers = [c for c in self.children.values() if c.name.startswith("worker")]
        stop_all(workers)
        stop_all([c for c in self.children.values() if c not in workers and c not in self.brokers])
        stop_all(self.brokers)
        self.lock.release()

    def table(self) -> Table:
        table = Table(title=f"gpu-fabric  ·  {self.http_url}/api/v1  ·  docs /schema  ·  {redact(self.nats_url)}")
        for column in ("component", "pid", "state", "restarts", "log"):
            table.add_column(column)
        for child in self.children.values():
            style = "green" if child.running else "red"
            pid = str(child.process.pid) if child.process else "-"
            table.add_row(child.name, pid, f"[{style}]{child.state}[/]", str(child.restarts), str(child.log_path))
        return table


async def _has_stream(nc: NatsClient, stream: str) -> bool:
    try:
        await nc.jetstream().stream_info(stream)
    except NotFoundError:
        return False
    return True


def _replica_names(service: str, count: int) -> list[str]:
    """`gateway`, `gateway-2`, ...: the first is named as when it runs alone."""
    return [service if index == 1 else f"{service}-{index}" for index in range(1, count + 1)]


def _listening(child: Child) -> bool:
    """Whether `child` holds a listening TCP socket (a gateway has bound the port it shares)."""
    if not child.running:
        return False
    assert child.process is not None
    try:
        return any(c.status == psutil.CONN_LISTEN for c in psutil.Process(child.process.pid).net_connections("tcp"))
    except psutil.Error:
        return False


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False
