"""Per-principal NATS identities (docs/security.md, "NATS identities") on a real nats-server with the
platform's nats.conf and a gateway answering its auth callout: each worker and each client reaches its
own subjects and nothing else, bad or revoked credentials are refused at connect, and nobody but the
platform reads the platform's inboxes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api as js_api

from gateway.admin import open_admin
from sdk import bus, subjects
from sdk.api import (
    MAX_RESULT_BYTES,
    CreateApiKey,
    CreateEnrollment,
    JobPage,
    ListJobs,
    ResultStored,
    UploadResult,
    WorkerCredentials,
)
from sdk.broker import EmbeddedNats
from sdk.connection import connect, request
from sdk.errors import BadRequest, JobNotFound, StaleAttempt, Unauthorized
from sdk.events import Assignment, JobAssigned, JobCompleted, JobSubmitted, encoder
from sdk.http import HttpClient
from sdk.log import append, ensure_streams, read_subject
from sdk.signing import sign
from tests.conftest import enroll_over_nats, serving_gateway, wait_until

#: The object store's stream (JetStream names an object store bucket's stream `OBJ_<bucket>`).
RESULTS_STREAM = f"OBJ_{subjects.RESULTS_BUCKET}"


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

    async def disconnected(self, what: str, timeout_s: float = 10.0) -> None:
        """Wait until the server has closed this connection (as it does on a revocation)."""

        async def closed() -> bool:
            return not self.nc.is_connected

        await wait_until(closed, timeout_s, what)

    async def refused_subscription(self, subject: str) -> Subscription:
        sub = await self.nc.subscribe(subject)
        await self.violation(f'Subscription to "{subject}"')
        return sub

    async def refused_publish(self, subject: str) -> None:
        await self.nc.publish(subject, b"{}")
        await self.violation(f'Publish to "{subject}"')


class Platform:
    """The server, a gateway answering its callout, and a platform connection."""

    def __init__(self, server: EmbeddedNats, nc: NatsClient, http_url: str) -> None:
        self.server = server
        self.nc = nc
        self.http_url = http_url
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
        registered = await enroll_over_nats(self.server.address, token or await self.enrollment_token(), name, "perm")
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
        async with serving_gateway(server.url, server.secrets_dir) as http_url:
            yield Platform(server, nc, http_url)
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
                    f"$KV.{subjects.WORKER_CONFIG_BUCKET}.{me.worker_id}", f"$JS.API.STREAM.PURGE.{subjects.DISPATCH_STREAM}",
                    # The object store: no enumeration by sequence, no metadata overwrite, no chunks.
                    f"$JS.API.STREAM.MSG.GET.{RESULTS_STREAM}", f"$JS.API.DIRECT.GET.{RESULTS_STREAM}.$O.x",
                    f"$JS.API.STREAM.INFO.{RESULTS_STREAM}", f"$O.{subjects.RESULTS_BUCKET}.M.x",
                    f"$O.{subjects.RESULTS_BUCKET}.C.x", f"$JS.API.STREAM.PURGE.{RESULTS_STREAM}"):
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


async def test_clients_request_any_direct_subject_and_each_worker_serves_only_its_own(
    platform: Platform, sessions: list[Session]
) -> None:
    me, other = await platform.enroll("direct-a"), await platform.enroll("direct-b")
    worker = await platform.as_worker(me)
    client = await platform.connect(**bus.client_options(await platform.api_key()))
    sessions += [worker, client]

    async def answer_in_three_messages(msg: Msg) -> None:
        for piece in (b"one", b"two", b"three"):  # a streamed answer: the response permission allows several
            await worker.nc.publish(msg.reply, piece)

    await worker.nc.subscribe(subjects.direct_subject(me.worker_id), cb=answer_in_three_messages)
    await worker.nc.subscribe(subjects.direct_end_subject(me.worker_id))
    await worker.nc.flush()
    inbox = client.nc.new_inbox()
    answers = await client.nc.subscribe(inbox)
    await client.nc.flush()
    await client.nc.publish(subjects.direct_subject(me.worker_id), b"{}", reply=inbox)
    received = []
    for _ in range(3):
        received.append((await answers.next_msg(timeout=5)).data)
    assert received == [b"one", b"two", b"three"], (worker.errors, client.errors)

    # A worker hears neither another worker's requests nor its end orders, and writes to no inbox unasked.
    for subject in (subjects.direct_subject(other.worker_id), subjects.direct_end_subject(other.worker_id), "direct.*",
                    "direct.>"):
        sub = await worker.refused_subscription(subject)
        await platform.nc.publish(subject.replace(">", "x").replace("*", "x"), b"secret")
        assert await nothing_arrives(sub), subject
    await worker.refused_publish(f"{inbox}.unasked")
    # A client cannot end a session on a worker (only the platform can), nor pose as a worker.
    await client.refused_publish(subjects.direct_end_subject(me.worker_id))
    sub = await client.refused_subscription(subjects.direct_subject(other.worker_id))
    await platform.nc.publish(subjects.direct_subject(other.worker_id), b"secret")
    assert await nothing_arrives(sub)


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

    await worker.disconnected("the revoked worker's connection to be closed")
    with pytest.raises(Unauthorized):
        await connect(platform.server.address, name="revoked-again", wait_s=0.5,
                      **bus.worker_options(me.worker_id, lambda: bytes.fromhex(me.hmac_secret_hex)))


async def test_a_revoked_api_key_is_disconnected_and_refused(platform: Platform, sessions: list[Session]) -> None:
    async with open_admin(platform.server.url, platform.server.secrets_dir) as admin:
        created = await admin.create_api_key(CreateApiKey(name="perm-revoked", role="client"))
    client = await platform.connect(**bus.client_options(created.api_key))
    sessions.append(client)
    async with open_admin(platform.server.url, platform.server.secrets_dir) as admin:
        await admin.revoke_api_key(created.key_id)

    await client.disconnected("the revoked key's connection to be closed")
    with pytest.raises(Unauthorized):
        await connect(platform.server.address, name="revoked-key", wait_s=0.5, **bus.client_options(created.api_key))


async def held_by(platform: Platform, worker_id: str) -> str:
    """A job the log says `worker_id` holds (attempt 1; appended as the platform, as the scheduler would)."""
    job_id = f"j{time.time_ns()}"
    await append(platform.js, subjects.job_subject(job_id), JobSubmitted(job_id=job_id, job_type="image"))
    assigned = JobAssigned(job_id=job_id, worker_id=worker_id, region="perm", attempt=1)
    await append(platform.js, subjects.job_subject(job_id), assigned)
    return job_id


async def test_results_are_uploaded_through_the_gateway_for_held_jobs_only(platform: Platform) -> None:
    me, other = await platform.enroll("upload-a"), await platform.enroll("upload-b")
    mine, theirs = await held_by(platform, me.worker_id), await held_by(platform, other.worker_id)
    secret = bytes.fromhex(me.hmac_secret_hex)
    nc = await connect(platform.server.address, name="uploader", **bus.worker_options(me.worker_id, lambda: secret))

    async def upload(job_id: str, attempt: int, data: bytes = b"\x89PNG-1", content_type: str = "image/png") -> str:
        subject = subjects.result_upload_subject(me.worker_id)
        body = msgspec.json.encode(UploadResult(job_id=job_id, attempt=attempt, content_type=content_type, data=data))  # type: ignore[arg-type]
        headers = sign(secret, subject, body, worker_id=me.worker_id)
        return (await request(nc, subject, body, ResultStored, headers=headers, timeout_s=10)).object

    try:
        assert await upload(mine, 1) == f"{mine}/1.0"
        assert await upload(mine, 1, b"\x89PNG-2") == f"{mine}/1.1"  # a second result, never an overwrite
        with pytest.raises(StaleAttempt):
            await upload(mine, 2)  # an attempt it does not hold
        with pytest.raises(StaleAttempt):
            await upload(theirs, 1)  # another worker's job
        with pytest.raises(BadRequest):
            await upload(mine, 1, b"<html>", "text/html")
        with pytest.raises(BadRequest):
            await upload(mine, 1, b"\0" * (MAX_RESULT_BYTES + 1))
    finally:
        await nc.close()
    store = await platform.js.object_store(subjects.RESULTS_BUCKET)
    assert (await store.get(f"{mine}/1.0")).data == b"\x89PNG-1"
    assert sorted(o.name for o in await store.list() if o.name.startswith((mine, theirs))) == [f"{mine}/1.0", f"{mine}/1.1"]

    # Served only when the object is the job's own, with the content type the gateway stored.
    images = [{"object": f"{mine}/1.0", "content_type": "text/html"}, {"object": f"{mine}/1.1"}]
    await append(platform.js, subjects.job_subject(mine), JobCompleted(job_id=mine, worker_id=me.worker_id, attempt=1,
                                                                       result={"images": images}))
    stolen = [{"object": f"{mine}/1.0", "content_type": "image/png"}]
    await append(platform.js, subjects.job_subject(theirs), JobCompleted(job_id=theirs, worker_id=other.worker_id,
                                                                         attempt=1, result={"images": stolen}))
    async with HttpClient(platform.http_url, api_key=await platform.api_key("operator")) as http:
        async with httpx.AsyncClient(base_url=platform.http_url) as raw:
            response = await raw.get(f"/api/v1/jobs/{mine}/result/0", headers=await http.auth.headers())
        assert (response.status_code, response.headers["content-type"], response.content) == (200, "image/png", b"\x89PNG-1")
        assert await http.result(mine, 1) == b"\x89PNG-2"
        with pytest.raises(JobNotFound):
            await http.result(theirs, 0)


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
