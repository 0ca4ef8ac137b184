"""The NATS users and permissions of the platform's nats.conf (docs/security.md) on a real nats-server:
workers and clients can do their jobs and nothing more."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from sdk import subjects
from sdk.broker import EmbeddedNats, nats_passwords
from sdk.events import Assignment, encoder
from sdk.log import ensure_streams, read_subject


class Session:
    """A connection as one user, with the server's asynchronous errors (permission violations) collected."""

    def __init__(self, nc: NatsClient, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors

    async def violation(self, text: str, timeout_s: float = 5.0) -> None:
        """Wait until the server reported a permissions violation mentioning `text` (nats-py lowercases it)."""
        deadline = time.monotonic() + timeout_s
        expected = f"permissions violation for {text}".lower()
        while not any(expected in e.lower() for e in self.errors):
            assert time.monotonic() < deadline, f"no violation for {text}; errors: {self.errors}"
            await asyncio.sleep(0.01)


Login = Callable[[str], Awaitable[Session]]


@pytest.fixture
def passwords() -> dict[str, str]:
    return nats_passwords()


@pytest.fixture
def secured_nats(tmp_path: Path, passwords: dict[str, str]) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats", env=passwords)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def login(secured_nats: EmbeddedNats, passwords: dict[str, str]) -> AsyncIterator[Login]:
    sessions: list[Session] = []

    async def connect_as(user: str) -> Session:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(
            secured_nats.address,
            user=user,
            password=passwords[f"GF_{user.upper()}_PASSWORD"],
            error_cb=on_error,
            allow_reconnect=False,
        )
        session = Session(nc, errors)
        sessions.append(session)
        return session

    yield connect_as
    for session in sessions:
        await session.nc.close()


@pytest.fixture
async def platform(login: Login) -> Session:
    session = await login("platform")
    await ensure_streams(session.nc.jetstream())

    async def answer(msg: Msg) -> None:
        await msg.respond(b"ok:" + msg.subject.encode())

    await session.nc.subscribe("api.>", cb=answer)
    return session


async def test_worker_can_report_but_cannot_write_the_event_log(platform: Session, login: Login) -> None:
    worker = await login("worker")

    await worker.nc.publish("jobs.x", b'{"type":"job.completed"}')
    await worker.nc.flush()
    await worker.violation('Publish to "jobs.x"')
    assert await read_subject(platform.nc.jetstream(), subjects.JOBS_STREAM, "jobs.x") == []

    reply = await worker.nc.request(subjects.report_subject("x"), b"{}", timeout=5)
    assert reply.data == b"ok:api.workers.report.x"
    reply = await worker.nc.request(subjects.heartbeat_request_subject("x"), b"{}", timeout=5)
    assert reply.data == b"ok:api.workers.heartbeat.x"
    reply = await worker.nc.request(subjects.rotate_subject("x"), b"{}", timeout=5)
    assert reply.data == b"ok:api.workers.rotate.x"

    for forbidden in ("workers.x", subjects.API_WORKERS_CONFIG_SET, subjects.API_JOBS_SUBMIT, "dispatch.eu.x"):
        await worker.nc.publish(forbidden, b"{}")
        await worker.violation(f'Publish to "{forbidden}"')
    await worker.nc.subscribe("jobs.>")
    await worker.violation('Subscription to "jobs.>"')


async def test_worker_consumes_its_dispatch_reads_its_config_and_puts_results(platform: Session, login: Login) -> None:
    pjs = platform.nc.jetstream()
    config = await pjs.key_value(subjects.WORKER_CONFIG_BUCKET)
    await config.put("w1", b'{"max_concurrency":2}')
    assignment = Assignment(job_id="j1", attempt=1, job_type="echo", model=None, params={}, timeout_s=30.0)
    await pjs.publish(subjects.dispatch_subject("eu", "w1"), encoder.encode(assignment))

    worker = await login("worker")
    js = worker.nc.jetstream()
    sub = await js.subscribe(
        subjects.dispatch_subject("eu", "w1"),
        durable=subjects.dispatch_consumer("w1"),
        stream=subjects.DISPATCH_STREAM,
        manual_ack=True,
    )
    msg = await sub.next_msg(timeout=5)
    assert msg.data == encoder.encode(assignment)
    await msg.ack_sync(timeout=5)
    # Work-queue retention: the acknowledged dispatch is gone.
    assert (await pjs.stream_info(subjects.DISPATCH_STREAM)).state.messages == 0

    kv = await js.key_value(subjects.WORKER_CONFIG_BUCKET)
    assert (await kv.get("w1")).value == b'{"max_concurrency":2}'
    watcher = await kv.watch("w1")
    assert (await watcher.updates(timeout=5)).value == b'{"max_concurrency":2}'
    assert await watcher.updates(timeout=5) is None
    await config.put("w1", b'{"max_concurrency":3}')
    assert (await watcher.updates(timeout=5)).value == b'{"max_concurrency":3}'
    await watcher.stop()

    results = await js.object_store(subjects.RESULTS_BUCKET)
    await results.put("j1/out.png", b"\x89PNG...")
    assert (await (await pjs.object_store(subjects.RESULTS_BUCKET)).get("j1/out.png")).data == b"\x89PNG..."
    await worker.nc.flush()
    assert worker.errors == []

    # Reading is all: the worker cannot change its configuration, or purge results, itself.
    await worker.nc.publish("$KV.worker-config.w1", b"{}")
    await worker.violation('Publish to "$KV.worker-config.w1"')
    await worker.nc.publish("$JS.API.STREAM.PURGE.OBJ_results", b"{}")
    await worker.violation('Publish to "$JS.API.STREAM.PURGE.OBJ_results"')


async def test_client_submits_jobs_and_reads_streams_but_nothing_else(platform: Session, login: Login) -> None:
    client = await login("client")

    reply = await client.nc.request(subjects.API_JOBS_SUBMIT, b"{}", timeout=5)
    assert reply.data == b"ok:api.jobs.submit"
    reply = await client.nc.request(subjects.API_AUTH_TOKEN, b"{}", timeout=5)
    assert reply.data == b"ok:api.auth.token"
    tokens = await client.nc.subscribe(subjects.stream_subject("j1"))
    await client.nc.flush()
    await platform.nc.publish(subjects.stream_subject("j1"), b"hello")
    assert (await tokens.next_msg(timeout=5)).data == b"hello"

    for forbidden in (subjects.report_subject("x"), "jobs.x", subjects.API_WORKERS_CONFIG_SET, "$JS.API.STREAM.LIST"):
        await client.nc.publish(forbidden, b"{}")
        await client.violation(f'Publish to "{forbidden}"')
    for forbidden in ("dispatch.>", "api.>"):
        await client.nc.subscribe(forbidden)
        await client.violation(f'Subscription to "{forbidden}"')


async def test_wrong_or_missing_password_is_refused(secured_nats: EmbeddedNats, passwords: dict[str, str]) -> None:
    for user, password in [("worker", passwords["GF_CLIENT_PASSWORD"]), (None, None)]:
        with pytest.raises(NatsError, match="Authorization Violation"):
            nc = await nats.connect(
                secured_nats.address, user=user, password=password, allow_reconnect=False, connect_timeout=2
            )
            await nc.close()
