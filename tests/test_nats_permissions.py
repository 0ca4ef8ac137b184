"""Per-principal NATS identities (docs/security.md, "NATS identities") on a real nats-server with the
platform's nats.conf and a gateway answering its auth callout: each worker and each client reaches its
own subjects and nothing else, bad or revoked credentials are refused at connect, and nobody but the
platform reads the platform's inboxes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api as js_api

from gateway.admin import open_admin
from sdk import bus, subjects
from sdk.api import (
    CreateApiKey,
    CreateEnrollment,
    JobPage,
    ListJobs,
    Registered,
    RegisterWorker,
    WorkerCredentials,
)
from sdk.broker import EmbeddedNats
from sdk.connection import connect, request
from sdk.errors import Unauthorized
from sdk.events import Assignment, encoder
from sdk.log import ensure_streams, read_subject
from tests.conftest import serving_gateway, wait_until


class Session:
    """A connection as one identity, with the server's asynchronous errors (permission violations) collected."""

    def __init__(self, nc: NatsClient, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors

    async def violation(self, text: str, timeout_s: float = 5.0) -> None:
        """Wait until the server reported a permissions violation mentioning `text` (nats-py lowercases it)."""
        expected = f"permissions violation for {text}".lower()

        async def reported() -> bool:
            return any(expected in e.lower() for e in self.errors)

        await wait_until(reported, timeout_s, f"a violation for {text}; errors: {self.errors}")

    async def refused_subscription(self, subject: str) -> Subscription:
        sub = await self.nc.subscribe(subject)
        await self.violation(f'Subscription to "{subject}"')
        return sub

    async def refused_publish(self, subject: str) -> None:
        await self.nc.publish(subject, b"{}")
        await self.violation(f'Publish to "{subject}"')


class Platform:
    """The server, a gateway answering its callout, and a platform connection."""

    def __init__(self, server: EmbeddedNats, nc: NatsClient) -> None:
        self.server = server
        self.nc = nc
        self.js = nc.jetstream()

    async def connect(self, **identity: object) -> Session:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(self.server.address, error_cb=on_error, allow_reconnect=False, **identity)
        return Session(nc, errors)

    async def api_key(self, role: str = "client") -> str:
        async with open_admin(self.server.url, self.server.secrets_dir) as admin:
            return (await admin.create_api_key(CreateApiKey(name=f"perm-{role}", role=role))).api_key  # type: ignore[arg-type]

    async def enrollment_token(self) -> str:
        async with open_admin(self.server.url, self.server.secrets_dir) as admin:
            return (await admin.create_enrollment(CreateEnrollment(ttl_s=300))).enrollment_token

    async def enroll(self, name: str, token: str | None = None) -> WorkerCredentials:
        """A new worker, enrolled over NATS as a machine holding only its enrollment token."""
        token = token or await self.enrollment_token()
        nc = await connect(self.server.address, name=f"enroll-{name}", **bus.enrolling_options(token))
        try:
            req = RegisterWorker(name=name, region="perm", enrollment_token=token)
            registered = await request(nc, subjects.API_WORKERS_REGISTER, req, Registered)
        finally:
            await nc.close()
        assert registered.credentials is not None
        return registered.credentials

    async def as_worker(self, credentials: WorkerCredentials) -> Session:
        secret = bytes.fromhex(credentials.hmac_secret_hex)
        return await self.connect(**bus.worker_options(credentials.worker_id, lambda: secret))


@pytest.fixture(scope="module")
async def platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    server = EmbeddedNats(tmp_path_factory.mktemp("perm") / "nats")
    server.start()
    try:
        nc = await connect(server.url, name="test-platform")
        await ensure_streams(nc.jetstream())
        async with serving_gateway(server.url, server.secrets_dir):
            yield Platform(server, nc)
        await nc.close()
    finally:
        server.stop()


@pytest.fixture
async def sessions() -> AsyncIterator[list[Session]]:
    opened: list[Session] = []
    yield opened
    for session in opened:
        await session.nc.close()


async def nothing_arrives(sub: Subscription, timeout_s: float = 0.5) -> bool:
    try:
        await sub.next_msg(timeout=timeout_s)
    except NatsTimeoutError:
        return True
    return False


async def test_a_worker_reaches_its_own_subjects_only(platform: Platform, sessions: list[Session]) -> None:
    me, other = await platform.enroll("perm-a"), await platform.enroll("perm-b")
    worker = await platform.as_worker(me)
    sessions.append(worker)

    # Its own endpoints are answered (a wrong signature is the gateway's refusal, not the broker's).
    with pytest.raises(Unauthorized):
        await request(worker.nc, subjects.report_subject(me.worker_id), b"{}", dict, headers={"X-Worker-Id": "x"})

    # Other workers' traffic, the platform's inboxes, the log, dispatches and token streams: refused, unseen.
    for subject in ("_INBOX.>", f"{subjects.PLATFORM_INBOX_PREFIX}.>", f"{subjects.worker_inbox_prefix(other.worker_id)}.>",
                    "dispatch.>", subjects.dispatch_subject("perm", other.worker_id), "stream.>",
                    subjects.stream_subject(other.worker_id, "*"), "jobs.>"):
        sub = await worker.refused_subscription(subject)
        await platform.nc.publish(subject.replace(">", "x").replace("*", "x"), b"secret")
        assert await nothing_arrives(sub), subject

    for subject in ("jobs.forged", "workers.forged", subjects.report_subject(other.worker_id), subjects.rotate_subject(other.worker_id),
                    subjects.heartbeat_request_subject(other.worker_id), subjects.stream_subject(other.worker_id, "j1"),
                    subjects.API_WORKERS_CONFIG_SET, subjects.API_JOBS_SUBMIT, "dispatch.perm.x",
                    f"$KV.{subjects.WORKER_CONFIG_BUCKET}.{me.worker_id}", f"$JS.API.STREAM.PURGE.{subjects.DISPATCH_STREAM}"):
        await worker.refused_publish(subject)
    assert await read_subject(platform.js, subjects.JOBS_STREAM, "jobs.forged") == []


async def test_a_worker_consumes_only_its_own_dispatches(platform: Platform, sessions: list[Session]) -> None:
    me, other = await platform.enroll("disp-a"), await platform.enroll("disp-b")
    worker = await platform.as_worker(me)
    sessions.append(worker)
    assignment = Assignment(job_id="j1", attempt=1, job_type="echo", model=None, params={}, timeout_s=30.0)
    await platform.js.publish(subjects.dispatch_subject("perm", other.worker_id), encoder.encode(assignment))
    await platform.js.publish(subjects.dispatch_subject("perm", me.worker_id), encoder.encode(assignment))

    js = worker.nc.jetstream()

    def consumer_of(worker_id: str) -> js_api.ConsumerConfig:
        name = subjects.dispatch_consumer(worker_id)
        return js_api.ConsumerConfig(name=name, durable_name=name, ack_policy=js_api.AckPolicy.EXPLICIT)

    sub = await js.subscribe(
        subjects.dispatch_subject("*", me.worker_id), stream=subjects.DISPATCH_STREAM, manual_ack=True,
        config=consumer_of(me.worker_id),
    )
    msg = await sub.next_msg(timeout=5)
    assert msg.data == encoder.encode(assignment)
    await msg.ack_sync(timeout=5)

    # Another worker's consumer: not by its name, not through the legacy durable create (whose filter
    # is in the body), not with its own consumer's name and another worker's filter.
    for subject in (
        f"$JS.API.CONSUMER.CREATE.{subjects.DISPATCH_STREAM}.{subjects.dispatch_consumer(other.worker_id)}.dispatch.perm.{other.worker_id}",
        f"$JS.API.CONSUMER.CREATE.{subjects.DISPATCH_STREAM}.{subjects.dispatch_consumer(me.worker_id)}.dispatch.perm.{other.worker_id}",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.DISPATCH_STREAM}.{subjects.dispatch_consumer(me.worker_id)}",
        f"$JS.API.CONSUMER.CREATE.{subjects.DISPATCH_STREAM}",
    ):
        await worker.refused_publish(subject)
    with pytest.raises(Exception):
        await js.subscribe(
            subjects.dispatch_subject("*", other.worker_id), stream=subjects.DISPATCH_STREAM, manual_ack=True,
            config=consumer_of(other.worker_id),
        )
    # The other worker's dispatch is still waiting for it.
    assert (await platform.js.stream_info(subjects.DISPATCH_STREAM)).state.messages >= 1
    info = await platform.js.consumer_info(subjects.DISPATCH_STREAM, subjects.dispatch_consumer(me.worker_id))
    assert info.config.filter_subject == subjects.dispatch_subject("*", me.worker_id)


async def test_a_client_reaches_the_job_api_and_its_own_inboxes_only(
    platform: Platform, sessions: list[Session]
) -> None:
    key, other_key = await platform.api_key(), await platform.api_key()
    client = await platform.connect(**bus.client_options(key))
    sessions.append(client)

    with pytest.raises(Unauthorized) as exc:  # answered by the gateway: no access token in the request
        await request(client.nc, subjects.API_JOBS_LIST, ListJobs(), JobPage)
    assert exc.value.details["reason"] == "missing_header"

    other_inbox = subjects.credential_inbox_prefix(subjects.CLIENT_INBOX_ROOT, other_key)
    for subject in ("_INBOX.>", f"{subjects.PLATFORM_INBOX_PREFIX}.>", f"{other_inbox}.>", "stream.>",
                    "dispatch.>", "api.>", "jobs.>"):
        sub = await client.refused_subscription(subject)
        await platform.nc.publish(subject.replace(">", "x"), b"secret")
        assert await nothing_arrives(sub), subject
    for subject in (subjects.report_subject("x"), "jobs.x", subjects.API_WORKERS_LIST, subjects.API_WORKERS_CONFIG_SET,
                    "$JS.API.STREAM.LIST", f"$JS.API.STREAM.MSG.GET.OBJ_{subjects.RESULTS_BUCKET}",
                    f"$O.{subjects.RESULTS_BUCKET}.M.x", "stream.w1.j1"):
        await client.refused_publish(subject)


async def test_an_operator_key_also_reaches_the_worker_queries(platform: Platform, sessions: list[Session]) -> None:
    operator = await platform.connect(**bus.client_options(await platform.api_key("operator")))
    sessions.append(operator)
    reply = await operator.nc.request(subjects.API_WORKERS_LIST, b"{}", timeout=5)
    assert b"missing_header" in reply.data  # reached the gateway, which wants the access token too
    await operator.refused_publish(subjects.report_subject("x"))


async def test_bad_credentials_are_refused_at_connect(platform: Platform) -> None:
    me = await platform.enroll("refused")
    secret = bytes.fromhex(me.hmac_secret_hex)
    proof = bus.worker_proof(me.worker_id, secret)
    used_token = await platform.enrollment_token()
    await platform.enroll("spends-its-token", used_token)
    forged = bus.worker_proof(me.worker_id, b"\0" * 32)
    stale = bus.worker_proof(me.worker_id, secret).split(".")
    stale[1] = str(int(stale[1]) - 600_000)
    nc = await connect(platform.server.address, name="first", token=proof)  # the proof, once
    await nc.close()
    for name, token in [("none", None), ("forged proof", forged), ("replayed proof", proof),
                        ("stale proof", ".".join(stale)), ("unknown API key", "gfk_0123456789abcdef.bm9wZQ"),
                        ("used enrollment token", used_token), ("junk", "hello")]:
        options = {} if token is None else {"token": token}
        with pytest.raises(Unauthorized):
            await connect(platform.server.address, name=name, wait_s=0.5, **options)


async def test_a_revoked_worker_is_disconnected_and_refused(platform: Platform, sessions: list[Session]) -> None:
    me = await platform.enroll("revoked")
    worker = await platform.as_worker(me)
    sessions.append(worker)
    assert worker.nc.is_connected
    async with open_admin(platform.server.url, platform.server.secrets_dir) as admin:
        await admin.revoke_worker(me.worker_id)

    async def closed() -> bool:
        return not worker.nc.is_connected

    await wait_until(closed, 10, "the revoked worker's connection to be closed")
    with pytest.raises(Unauthorized):
        await connect(platform.server.address, name="revoked-again", wait_s=0.5,
                      **bus.worker_options(me.worker_id, lambda: bytes.fromhex(me.hmac_secret_hex)))


async def test_connect_cost(platform: Platform) -> None:
    """Each identity costs one callout round trip at connect; measured here (docs/benchmarks.md)."""
    key = await platform.api_key()
    started = time.perf_counter()
    for _ in range(20):
        nc = await connect(platform.server.address, name="cost", **bus.client_options(key))
        await nc.close()
    per_connect_s = (time.perf_counter() - started) / 20
    started = time.perf_counter()
    for _ in range(20):
        nc = await connect(platform.server.url, name="cost-static")
        await nc.close()
    static_s = (time.perf_counter() - started) / 20
    print(f"connect with the auth callout {per_connect_s * 1000:.1f} ms, static user {static_s * 1000:.1f} ms")
    assert per_connect_s < 1.0
