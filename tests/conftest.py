"""Shared fixtures: a real nats-server from the wheel, on a free port, with a temporary store."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from sdk.broker import EmbeddedNats
from sdk.client import Client
from sdk.connection import connect
from sdk.errors import PlatformError
from sdk.http import HttpClient
from sdk.local import LocalStack
from sdk.log import ensure_streams

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


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NatsClient]:
    client = await connect(nats_server.url, name="test")
    await ensure_streams(client.jetstream())
    yield client
    await client.close()


# --- Tiny random-weight models, saved and loaded through the real from_pretrained path --------------


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2")


@pytest.fixture(scope="session")
def tiny_diffusion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_diffusion

    return build_tiny_diffusion(tmp_path_factory.mktemp("models") / "diffusion")


# --- The platform as a user runs it: every component a real process ------------------------------

HEARTBEAT_INTERVAL_S = 0.4


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0, what: str = "condition") -> None:
    """Poll `check` until it holds; fail the test with `what` after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def start_stack(data_dir: Path, workers: list[str]) -> LocalStack:
    """Gateway, scheduler, projections and `workers`, with short heartbeats so losses show in seconds."""
    stack = LocalStack(data_dir)
    stack.start()
    try:
        async with HttpClient(stack.http_url) as http:
            async def gateway_up() -> bool:
                try:
                    return (await http.health())["status"] == "ok"
                except PlatformError:
                    return False

            await wait_until(gateway_up, 30, "the gateway")
            await http.set_config_defaults({"heartbeat_interval_s": HEARTBEAT_INTERVAL_S})
            for name in workers:
                stack.start_worker(name)

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


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    """One platform for the end-to-end tests that leave it as they found it."""
    local = await start_stack(tmp_path_factory.mktemp("stack"), ["w1", "w2"])
    yield local
    local.stop()


@pytest.fixture
async def client(stack: LocalStack) -> AsyncIterator[Client]:
    sdk_client = await Client.connect(stack.nats_url)
    yield sdk_client
    await sdk_client.close()


@pytest.fixture
async def http(stack: LocalStack) -> AsyncIterator[HttpClient]:
    async with HttpClient(stack.http_url) as http_client:
        yield http_client
