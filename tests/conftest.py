"""Shared fixtures: a real nats-server from the wheel, on a free port, with a temporary store, run with
the platform's nats.conf (its users get new random passwords; `.url` connects as `platform`)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from nats.aio.client import Client as NatsClient

from gateway.auth import AuthSettings
from sdk import bus, subjects
from sdk.api import Registered, RegisterWorker
from sdk.broker import EmbeddedNats, free_port
from sdk.client import Client
from sdk.connection import connect, port_open, request
from sdk.errors import PlatformError
from sdk.http import HttpClient
from sdk.local import LocalStack
from sdk.log import ensure_streams

T = TypeVar("T")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """One server for the session; tests isolate themselves by using fresh ids."""
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A server of the test's own, for tests that stop it or need empty streams."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@asynccontextmanager
async def platform_nc(server: EmbeddedNats, name: str = "test") -> AsyncIterator[NatsClient]:
    """A connection as the platform's own user to `server`, with the platform's streams in place."""
    client = await connect(server.url, name=name)
    try:
        await ensure_streams(client.jetstream())
        yield client
    finally:
        await client.close()


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NatsClient]:
    async with platform_nc(nats_server) as client:
        yield client


# --- Tiny random-weight models, saved and loaded through the real from_pretrained path --------------


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("models") / "encoder")


@pytest.fixture(scope="session")
def tiny_diffusion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_diffusion

    return build_tiny_diffusion(tmp_path_factory.mktemp("models") / "diffusion")


# --- The platform as a user runs it: every component a real process ------------------------------

HEARTBEAT_INTERVAL_S = 0.4


async def enroll_over_nats(url: str, token: str, name: str, region: str) -> Registered:
    """Register a new worker as a machine holding only `token` (its NATS identity may only register)."""
    nc = await connect(url, name=f"test-enroll-{name}", **bus.enrolling_options(token))
    try:
        req = RegisterWorker(name=name, region=region, enrollment_token=token)
        registered: Registered = await request(nc, subjects.API_WORKERS_REGISTER, req, Registered)
    finally:
        await nc.close()
    return registered


async def wait_until(check: Callable[[], Awaitable[T]], timeout_s: float = 20.0, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy, and return that; fail the test with `what` and the
    last answer after `timeout_s`. The one polling helper of the tests."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not (result := await check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {result!r}")
        await asyncio.sleep(0.05)
    return result


@asynccontextmanager
async def serving_gateway(
    nats_url: str,
    secrets_dir: Path,
    *,
    settings: AuthSettings = AuthSettings(),
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> AsyncIterator[str]:
    """A gateway in this process (uvicorn, HTTP and the NATS endpoints), for tests that need settings of
    their own (short token lifetimes, TLS); yields its base URL and stops it afterwards."""
    from gateway.main import serve

    port = free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(
            nats_url, "127.0.0.1", port, stop,
            secrets_dir=secrets_dir, settings=settings, tls_cert=tls_cert, tls_key=tls_key,
        )
    )

    async def listening() -> bool:
        assert not task.done(), "the gateway exited while starting"
        return await asyncio.to_thread(port_open, "127.0.0.1", port)

    try:
        await wait_until(listening, 20, "the gateway to listen")
        yield f"{'https' if tls_cert else 'http'}://127.0.0.1:{port}"
    finally:
        stop.set()
        await task


async def start_stack(
    data_dir: Path, workers: list[str], regions: dict[str, str] | None = None, **options: Any
) -> LocalStack:
    """Gateway, scheduler, projections and `workers` (in `regions[name]`, default `local`), with short
    heartbeats so losses show in seconds. Each worker enrolls with a token of its own;
    `stack.operator_key` is an operator's API key. `options` go to `LocalStack` (`cluster=3`,
    `gateways=2`, `projections=2`, ...)."""
    stack = LocalStack(data_dir, **options)
    stack.start()
    try:
        async with HttpClient(stack.http_url, api_key=stack.operator_key) as http:
            async def gateway_up() -> bool:
                try:
                    return (await http.health())["status"] == "ok"
                except PlatformError:
                    return False

            await wait_until(gateway_up, 30, "the gateway")
            await http.set_config_defaults({"heartbeat_interval_s": HEARTBEAT_INTERVAL_S})
            for name in workers:
                stack.start_worker(name, (regions or {}).get(name, "local"))

            async def workers_online() -> bool:
                try:
                    online = [w for w in await http.workers() if w.status == "online" and w.last_heartbeat]
                except Exception:
                    return False
                return {w.name for w in online} >= set(workers)

            await wait_until(workers_online, 60, f"workers {workers}")
    except BaseException:
        stack.stop()
        raise
    return stack


@asynccontextmanager
async def running_stack(
    data_dir: Path, workers: list[str], regions: dict[str, str] | None = None, **options: Any
) -> AsyncIterator[LocalStack]:
    """`start_stack` for the length of a `with` block: every process is stopped by its PID at the end."""
    stack = await start_stack(data_dir, workers, regions, **options)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    """One platform for the end-to-end tests that leave it as they found it."""
    async with running_stack(tmp_path_factory.mktemp("stack"), ["w1", "w2"]) as local:
        yield local


@pytest.fixture
async def client(stack: LocalStack) -> AsyncIterator[Client]:
    """An operator's SDK client over NATS (as the `platform` user, like operator tools)."""
    sdk_client = await Client.connect(stack.nats_url, api_key=stack.operator_key)
    yield sdk_client
    await sdk_client.close()


@pytest.fixture
async def http(stack: LocalStack) -> AsyncIterator[HttpClient]:
    """An operator's SDK client over HTTP."""
    async with HttpClient(stack.http_url, api_key=stack.operator_key) as http_client:
        yield http_client
