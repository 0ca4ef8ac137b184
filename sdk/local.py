"""The platform on one machine: a real nats-server plus each component as a child process.

`gpuctl up` runs it for people; the end-to-end tests and the benchmarks run the same thing, so what
they measure is what a user starts. Every child is stopped by its PID.

The data dir keeps the secrets of the installation in `secrets/` (mode 0700, files 0600), created on
first run and reused after:

| file            | what                                                                     |
| --------------- | ------------------------------------------------------------------------ |
| `nats.env`      | the NATS users' passwords (`GF_PLATFORM_PASSWORD=...`), for nats-server   |
| `master.key`    | the gateway's master key (every token MAC and worker secret derives from it) |
| `operator.key`  | an operator API key, created on first run for the person running `gpuctl up` |

Children get their NATS URL, credentials included, through the environment (`NATS_URL`), never on
the command line: services as the `platform` user, workers as `worker`.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

from rich.table import Table

from sdk.api import ApiKeyRole, CreateApiKey, CreateEnrollment
from sdk.broker import EmbeddedNats, free_port, nats_passwords, password_variable
from sdk.connection import redact, with_user
from sdk.private_files import write_private
from sdk.process import Child, stop_all

if TYPE_CHECKING:
    from gateway.admin import Admin

logger = logging.getLogger(__name__)

T = TypeVar("T")

SECRETS_DIR = "secrets"
NATS_ENV_FILE = "nats.env"
OPERATOR_KEY_FILE = "operator.key"
#: Held by the stack that runs on a data dir (`DataDirLock`).
LOCK_FILE = "gpuctl.lock"
#: A worker finishes or hands back its jobs when stopped (its drain, 30 s by default): wait a bit longer.
WORKER_STOP_TIMEOUT_S = 45.0
#: Where `gpu-worker start` keeps its credentials in its state dir (`worker.config.LocalConfig`).
WORKER_CREDENTIALS_FILE = "credentials.json"


def load_or_create_nats_env(path: Path) -> dict[str, str]:
    """The NATS passwords in `path` (`NAME=value` lines), generated on first run."""
    if not path.exists():
        write_private(path, "".join(f"{name}={value}\n" for name, value in nats_passwords().items()).encode(), replace=False)
        logger.info("generated NATS passwords in %s", path)
    pairs = (line.partition("=") for line in path.read_text(encoding="utf-8").splitlines() if "=" in line)
    return {name.strip(): value.strip() for name, _, value in pairs}


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


def _holder(text: str) -> dict[str, object]:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def platform_url(data_dir: Path, url: str) -> str:
    """`url` as the platform user, with the password from the data dir unless `url` carries one."""
    if "@" in url:
        return url
    passwords = load_or_create_nats_env(Path(data_dir) / SECRETS_DIR / NATS_ENV_FILE)
    return with_user(url, "platform", passwords[password_variable("platform")])


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
        """With `nats_url` (credentials included) the stack uses that server for every component
        instead of starting one."""
        self.data_dir = Path(data_dir).resolve()
        self.logs = self.data_dir / "logs"
        self.secrets_dir = self.data_dir / SECRETS_DIR
        self.http_port = http_port or free_port()
        self.env = env or {}
        self.broker: EmbeddedNats | None = None
        if nats_url is not None:
            self.platform_url = self.worker_url = self.client_url = nats_url
        else:
            passwords = load_or_create_nats_env(self.secrets_dir / NATS_ENV_FILE)
            self.broker = EmbeddedNats(
                self.data_dir / "nats", port=nats_port, env=passwords, log_file=self.logs / "nats-server.log"
            )
            self.platform_url = self.broker.url_as("platform")
            self.worker_url = self.broker.url_as("worker")
            self.client_url = self.broker.url_as("client")
        #: An operator API key (from `secrets/operator.key`, created on the first start).
        self.operator_key: str | None = None
        #: Every process of the stack, broker first: started, restarted and shown in this order.
        self.children: dict[str, Child] = {}
        self.lock = DataDirLock(self.data_dir)

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

    def _child(
        self, name: str, args: list[str], module: str = "sdk.ctl", env: dict[str, str] | None = None
    ) -> Child:
        child = Child(
            name, [sys.executable, "-m", module, *args], self.logs / f"{name}.log", env={**self.env, **(env or {})}
        )
        self.children[name] = child
        child.start()
        return child

    def service(self, name: str, args: list[str]) -> Child:
        """A `gpuctl <command>` child connected as the platform user."""
        env = {"NATS_URL": self.platform_url, "GF_SECRETS_DIR": str(self.secrets_dir)}
        return self._child(name, args, env=env)

    def start(self, workers: list[str] = ()) -> None:  # type: ignore[assignment]
        """Refuses at once (`DataDirInUse`) when another stack holds the data dir. Spawn children from a
        thread that lives as long as the stack (they die with the thread that started them, `sdk.process`)."""
        self.lock.acquire(self.http_url)
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.broker is not None:
            self.children[self.broker.name] = self.broker
            self.broker.start()
        self.operator_key = self._operator_key()
        self.service("gateway", ["gateway", "--http-port", str(self.http_port)])
        self.service("scheduler", ["scheduler"])
        self.service("projections", ["projections", "--db", str(self.data_dir / "projections.db")])
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
        child = self._child(
            f"worker-{name}" if name != "local" else "worker", args, module="worker", env={**worker_env, **(env or {})}
        )
        child.stop_timeout_s = WORKER_STOP_TIMEOUT_S
        return child

    # --- Operator actions, from the data dir (like `gpuctl keys|workers`) ---------------------------

    def admin(self) -> AbstractAsyncContextManager[Admin]:
        """`async with stack.admin() as admin:` the operator's actions (`gateway.admin.Admin`)."""
        from gateway.admin import open_admin

        return open_admin(self.platform_url, self.secrets_dir)

    def create_api_key(self, name: str, role: ApiKeyRole = "client") -> str:
        """A new API key (blocking; from async code use `admin()`)."""
        created = self._blocking(lambda admin: admin.create_api_key(CreateApiKey(name=name, role=role)))
        return created.api_key

    def create_enrollment_token(self, worker_id: str | None = None, ttl_s: float = 3600.0) -> str:
        """A one-use enrollment token (blocking; from async code use `admin()`)."""
        request = CreateEnrollment(ttl_s=ttl_s, worker_id=worker_id)
        return self._blocking(lambda admin: admin.create_enrollment(request)).enrollment_token

    def _operator_key(self) -> str:
        if not self.operator_key_file.exists():
            write_private(self.operator_key_file, (self.create_api_key("operator (gpuctl up)", "operator") + "\n").encode(), replace=False)
            logger.info("created an operator API key in %s", self.operator_key_file)
        return self.operator_key_file.read_text(encoding="utf-8").strip()

    def _blocking(self, action: Callable[[Admin], Awaitable[T]]) -> T:
        """Run an admin action to completion from sync code, also when an event loop is running here
        (a test's): on a thread of its own, with a loop of its own."""

        async def run() -> T:
            async with self.admin() as admin:
                return await action(admin)

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, run()).result()

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
        stop_all([c for c in self.children.values() if c not in workers and c is not self.broker])
        if self.broker is not None:
            self.broker.stop()
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
