"""Security end to end, on the platform as `gpuctl up` runs it (the real nats.conf, its three users with
generated passwords, every component a process): tokens, refresh reuse, signed worker reports, NATS
permissions, revocation, ownership of jobs, and that no secret reaches a log or the event log.

Tests that need settings of their own (a one-second access token, rotation every second) run a gateway
in this process on a server of their own."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from gateway.admin import open_admin
from gateway.auth import AuthSettings, Credentials
from gateway.nats_api import NatsApi
from gateway.service import Gateway
from sdk import bus, subjects
from sdk.api import (
    Accepted,
    ApiKeyCreated,
    ApiKeyRole,
    CreateApiKey,
    CreateEnrollment,
    GetWorkerConfig,
    HeartbeatAck,
    IssueTokens,
    JobPage,
    JobView,
    ListJobs,
    Registered,
    RegisterWorker,
    ReportCompleted,
    ReportProgress,
    RotateCredentials,
    StreamChunk,
    SubmitJob,
    Submitted,
    TokenPair,
    WaitJob,
    WorkerConfigView,
    WorkerCredentials,
)
from sdk.broker import EmbeddedNats
from sdk.client import Client
from sdk.connection import connect, decode_reply, request
from sdk.errors import Forbidden, JobNotFound, PlatformError, StaleAttempt, Timeout, Unauthorized
from sdk.events import (
    Heartbeat,
    JobCompleted,
    JobEvent,
    JobProgress,
    JobRequeued,
    WorkerCredentialsRotated,
    encoder,
    event_type,
    job_event_decoder,
    worker_event_decoder,
)
from sdk.http import HttpClient
from sdk.local import LocalStack
from sdk.log import ensure_streams, read_subject
from sdk.signing import sign
from tests.conftest import enroll_over_nats, platform_nc, serving_gateway, wait_until
from worker.engines.echo import EchoEngine
from worker.runtime import Worker

pytestmark = pytest.mark.slow

#: Every secret the tests hand out or see, for `test_secrets_never_appear_in_logs_or_the_event_log` to look for
#: in logs and the event log (besides the secrets it hands out itself).
SEEN_SECRETS: set[str] = set()


def reason(exc: pytest.ExceptionInfo[PlatformError]) -> str:
    assert exc.value.details is not None
    return str(exc.value.details["reason"])


async def new_key(http: HttpClient, name: str, role: ApiKeyRole = "client") -> ApiKeyCreated:
    created = await http.create_api_key(f"{name}-{secrets.token_hex(3)}", role)
    SEEN_SECRETS.add(created.api_key)
    return created


async def operator_key(server: EmbeddedNats) -> str:
    """An operator key made from the secrets dir, as `gpuctl keys create --role operator` does."""
    async with open_admin(server.url, server.secrets_dir) as admin:
        created = await admin.create_api_key(CreateApiKey(name="operator", role="operator"))
    SEEN_SECRETS.add(created.api_key)
    return created.api_key


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def job_history(stack: LocalStack, job_id: str) -> list[JobEvent]:
    nc = await connect(stack.nats_url, name="test-inspect")
    try:
        raw = await read_subject(nc.jetstream(), subjects.JOBS_STREAM, subjects.job_subject(job_id))
    finally:
        await nc.close()
    return [job_event_decoder.decode(data) for data, _ in raw]


def worker_credentials(stack: LocalStack, name: str) -> WorkerCredentials:
    path = stack.data_dir / "workers" / name / "credentials.json"
    return msgspec.json.decode(path.read_bytes(), type=WorkerCredentials)


# --- Workers of these tests' own (regions nobody else submits to) -----------------------------------

HELD_REGION = "sec-a"
OTHER_REGION = "sec-b"
REVOKE_REGION = "sec-r"


@pytest.fixture(scope="module")
async def sec_workers(stack: LocalStack) -> AsyncIterator[dict[str, str]]:
    """Echo-only workers no test revokes: `sec1` in HELD_REGION, `sec2` in OTHER_REGION; name -> worker id."""
    async with echo_workers(stack, {"sec1": HELD_REGION, "sec2": OTHER_REGION}) as ids:
        yield ids


@asynccontextmanager
async def echo_workers(stack: LocalStack, names: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    """Echo-only worker processes `names` (name -> region), online for the `with` block; name -> worker id.
    Their enrollment tokens join SEEN_SECRETS."""
    for name, region in names.items():
        SEEN_SECRETS.add(stack.start_worker(name, region, "--engines", "echo").env.get("GPU_WORKER_ENROLLMENT_TOKEN", ""))
    try:
        async with HttpClient(stack.http_url, api_key=stack.operator_key) as http:

            async def online() -> bool:
                views = [w for w in await http.workers() if w.name in names and w.status == "online"]
                return len(views) == len(names)

            await wait_until(online, 60, f"the security tests' workers {sorted(names)}")
            yield {w.name: w.id for w in await http.workers() if w.name in names and w.status == "online"}
    finally:
        for name in names:
            stack.children.pop(f"worker-{name}").stop()


@pytest.fixture
async def revocable(stack: LocalStack) -> AsyncIterator[dict[str, str]]:
    """Two workers of the revocation test's own, in REVOKE_REGION: the one it revokes is no other test's."""
    async with echo_workers(stack, {"sec-r1": REVOKE_REGION, "sec-r2": REVOKE_REGION}) as ids:
        yield ids


@pytest.fixture(scope="module")
async def held_job(stack: LocalStack, sec_workers: dict[str, str]) -> AsyncIterator[str]:
    """A job `sec1` runs for the whole module; cancelled at the end."""
    async with HttpClient(stack.http_url, api_key=stack.operator_key) as http:
        job = await http.submit("echo", params={"sleep_s": 600}, region=HELD_REGION, timeout_s=900)

        async def running() -> bool:
            return (await http.get(job.id, min_seq=job.seq)).status == "running"

        await wait_until(running, 30, "the held job to run")
        assert (await http.get(job.id)).worker_id == sec_workers["sec1"]
        yield job.id
        await http.cancel(job.id)
        assert (await http.wait(job.id, timeout_s=30)).status == "cancelled"


@pytest.fixture
async def worker_nc(stack: LocalStack) -> AsyncIterator[NatsClient]:
    """A connection that reaches every worker's endpoints (as the platform's user): what the gateway
    checks below does not depend on who is connected. What NATS itself lets a worker's own identity
    do is tested in tests/test_nats_permissions.py."""
    nc = await connect(stack.nats_url, name="test-any-worker")
    yield nc
    await nc.close()


def signed_report(
    secret_hex: str, subject_worker: str, report: msgspec.Struct, **options: object
) -> tuple[str, bytes, dict[str, str]]:
    """A report on `subject_worker`'s subject, signed with `secret_hex` (`options` go to `sign`)."""
    subject = subjects.report_subject(subject_worker)
    body = msgspec.json.encode(report)
    return subject, body, sign(bytes.fromhex(secret_hex), subject, body, **options)  # type: ignore[arg-type]


async def send(nc: NatsClient, signed: tuple[str, bytes, dict[str, str]]) -> Accepted:
    subject, body, headers = signed
    return await request(nc, subject, body, Accepted, headers=headers)


def probe_report(job_id: str) -> ReportProgress:
    """A progress report whose message is a probe of its own, so the events it appended can be found."""
    return ReportProgress(job_id=job_id, attempt=1, progress=0.5, message=f"probe-{secrets.token_hex(4)}")


async def probes_appended(stack: LocalStack, probe: ReportProgress) -> list[JobEvent]:
    """The events of `probe`'s job that carry its message."""
    return [e for e in await job_history(stack, probe.job_id) if getattr(e, "message", None) == probe.message]


# --- Clients: tokens ---------------------------------------------------------------------------------


async def test_a_request_without_a_token_is_refused_with_401(stack: LocalStack) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url) as raw:
        response = await raw.get("/api/v1/jobs")
        assert response.status_code == 401
        assert (response.json()["code"], response.json()["details"]) == ("unauthorized", {"reason": "missing_header"})
        response = await raw.post("/api/v1/jobs", json={"type": "echo"}, headers={"Authorization": "Bearer nonsense"})
        assert (response.status_code, response.json()["details"]["reason"]) == (401, "malformed")
        assert (await raw.get("/health")).status_code == 200
        assert (await raw.get("/schema/openapi.json")).status_code == 200

    # Over NATS, a connection without credentials is refused by the broker itself...
    with pytest.raises(Unauthorized):
        await Client.connect(stack.client_url, api_key=None, wait_s=1)
    # ...and a client's connection that sends a request without its access token, by the gateway.
    async with HttpClient(stack.http_url, api_key=stack.operator_key) as operator:
        key = (await new_key(operator, "tokenless")).api_key
    nc = await connect(stack.client_url, name="test-tokenless", **bus.client_options(key))
    try:
        with pytest.raises(Unauthorized) as exc:
            await request(nc, subjects.API_JOBS_LIST, ListJobs(), JobPage)
        assert reason(exc) == "missing_header"
    finally:
        await nc.close()


async def test_an_expired_access_token_is_refreshed_by_the_sdk(
    fresh_nats: EmbeddedNats, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = AuthSettings(access_ttl_s=1.0)
    async with serving_gateway(fresh_nats.url, fresh_nats.secrets_dir, settings=settings) as url:
        async with HttpClient(url, api_key=await operator_key(fresh_nats)) as bootstrap:
            key = (await new_key(bootstrap, "expiry")).api_key
        client = await Client.connect(fresh_nats.address, api_key=key)
        async with HttpClient(url, api_key=key) as http, client:
            job = await http.submit("echo")
            await client.events(job.id)
            tokens = {http.auth.access_token, client.auth.access_token}

            async def expired() -> bool:
                async with httpx.AsyncClient(base_url=url) as raw:
                    response = await raw.get(f"/api/v1/jobs/{job.id}/events", headers=bearer(http.auth.access_token))
                return response.status_code == 401 and response.json()["details"]["reason"] == "expired"

            await wait_until(expired, 5, "the access token to expire")
            # Neither caller sees the expiry: each refreshes once and its request goes through.
            assert [e.seq for e in await http.events(job.id)] == [job.seq]
            assert [e.seq for e in await client.events(job.id)] == [job.seq]
            assert (http.auth.renewals, client.auth.renewals) == (1, 1)
            assert {http.auth.access_token, client.auth.access_token}.isdisjoint(tokens)
            tokens |= {http.auth.access_token, client.auth.access_token, key}
    # The gateway ran in this process: none of its log records (nor the SDK's) holds a credential.
    assert caplog.records and not any(token and token in caplog.text for token in tokens)


async def test_refresh_reuse_revokes_the_family(stack: LocalStack, http: HttpClient) -> None:
    key = await new_key(http, "reuse")
    async with httpx.AsyncClient(base_url=stack.http_url) as raw:

        async def tokens(path: str, body: dict[str, str]) -> httpx.Response:
            return await raw.post(path, json=body)

        issued = await tokens("/api/v1/auth/token", {"api_key": key.api_key})
        first = msgspec.json.decode(issued.content, type=TokenPair)
        refreshed = await tokens("/api/v1/auth/refresh", {"refresh_token": first.refresh_token})
        second = msgspec.json.decode(refreshed.content, type=TokenPair)
        SEEN_SECRETS.update({first.access_token, first.refresh_token, second.access_token, second.refresh_token})
        assert (await raw.get("/api/v1/jobs", headers=bearer(second.access_token))).status_code == 200

        # The spent refresh token again: someone else holds the chain, so the whole family goes.
        reused = await tokens("/api/v1/auth/refresh", {"refresh_token": first.refresh_token})
        assert (reused.status_code, reused.json()["details"]["reason"]) == (401, "reused")
        current = await tokens("/api/v1/auth/refresh", {"refresh_token": second.refresh_token})
        assert (current.status_code, current.json()["details"]["reason"]) == (401, "revoked")
        listed = await raw.get("/api/v1/jobs", headers=bearer(second.access_token))
        assert (listed.status_code, listed.json()["details"]["reason"]) == (401, "revoked")

    family = second.refresh_token.split("_", 1)[1].split(".")[0]
    log = (stack.logs / "gateway.log").read_text()
    assert f"refresh token reuse in family {family} of client {key.key_id}: family revoked" in log
    # The API key itself still works: it starts a new family.
    async with HttpClient(stack.http_url, api_key=key.api_key) as again:
        assert (await again.list()).items == []


async def test_a_revoked_api_key_is_refused_with_401(stack: LocalStack, http: HttpClient) -> None:
    key = await new_key(http, "revoked")
    async with HttpClient(stack.http_url, api_key=key.api_key) as holder:
        await holder.submit("echo")
        await http.revoke_api_key(key.key_id)
        with pytest.raises(Unauthorized) as exc:
            await holder.list()
        assert reason(exc) == "revoked"
    async with HttpClient(stack.http_url, api_key=key.api_key) as newcomer:
        with pytest.raises(Unauthorized) as exc:
            await newcomer.list()
        assert reason(exc) == "revoked"
    assert next(k for k in await http.list_api_keys() if k.key_id == key.key_id).revoked_at_ms is not None


async def test_admin_routes_need_an_operator(stack: LocalStack, http: HttpClient) -> None:
    key = await new_key(http, "not-an-operator")
    async with HttpClient(stack.http_url, api_key=key.api_key) as client:
        calls = [
            lambda: client.create_api_key("mine"), client.list_api_keys, client.create_enrollment_token,
            client.workers, lambda: client.revoke_worker("w-any"), lambda: client.set_config_defaults({}),
        ]
        for call in calls:
            with pytest.raises(Forbidden):
                await call()
    async with httpx.AsyncClient(base_url=stack.http_url) as raw:
        assert (await raw.post("/api/v1/admin/keys", json={"name": "x"})).status_code == 401
        token = (await raw.post("/api/v1/auth/token", json={"api_key": key.api_key})).json()["access_token"]
        response = await raw.get("/api/v1/admin/keys", headers=bearer(token))
        assert (response.status_code, response.json()["code"]) == (403, "forbidden")


async def test_revoking_or_rotating_what_does_not_exist_is_404_logged_in_one_line(stack: LocalStack) -> None:
    gateway_log = stack.logs / "gateway.log"
    tracebacks = gateway_log.read_text().count("Traceback")
    async with httpx.AsyncClient(base_url=stack.http_url) as raw:
        token = (await raw.post("/api/v1/auth/token", json={"api_key": stack.operator_key})).json()["access_token"]
        answers = [
            await raw.delete(f"/api/v1/admin/keys/{'0' * 16}", headers=bearer(token)),
            await raw.post("/api/v1/admin/workers/w-nobody/rotate", headers=bearer(token)),
            await raw.post("/api/v1/admin/workers/w-nobody/revoke", headers=bearer(token)),
        ]
    assert [(a.status_code, a.json()["code"], a.json()["details"]["reason"]) for a in answers] == [
        (404, "api_key_not_found", "unknown"), (404, "worker_not_found", "unknown"), (404, "worker_not_found", "unknown"),
    ]

    async def logged() -> bool:
        return "POST /api/v1/admin/workers/w-nobody/revoke: 404 worker w-nobody is not enrolled" in gateway_log.read_text()

    await wait_until(logged, 10, "the 404 in the gateway's log")
    # A refusal the API answers on purpose is one line: no traceback for it.
    assert gateway_log.read_text().count("Traceback") == tracebacks


async def test_a_client_sees_only_its_own_jobs_and_an_operator_sees_all(stack: LocalStack, http: HttpClient) -> None:
    alice, bob = (await new_key(http, "alice")).api_key, (await new_key(http, "bob")).api_key
    async with HttpClient(stack.http_url, api_key=alice) as a_http, HttpClient(stack.http_url, api_key=bob) as b_http, \
            await Client.connect(stack.client_url, api_key=bob) as b_nats:
        job = await a_http.submit("echo", params={"secret": "alice's"})
        done = await a_http.wait(job.id, timeout_s=30)
        assert done.status == "completed"

        for stranger in (b_http, b_nats):
            for call in (stranger.get(job.id), stranger.cancel(job.id), stranger.events(job.id),
                         stranger.wait(job.id, timeout_s=1)):
                with pytest.raises(JobNotFound):
                    await call
            assert job.id not in [j.id for j in (await stranger.list(limit=500)).items]
        mine = await b_http.submit("echo")
        await b_http.wait(mine.id, timeout_s=30)

        await a_http.get(job.id, min_seq=done.seq)  # the read model has it
        assert [j.id for j in (await a_http.list()).items] == [job.id]
        assert [j.id for j in (await b_http.list()).items] == [mine.id]
        everything = {j.id for j in (await http.list(limit=500)).items}
        assert {job.id, mine.id} <= everything
        assert (await http.get(job.id)).result == {"secret": "alice's"}


# --- Workers: signed reports --------------------------------------------------------------------------


async def test_a_forged_report_is_refused_and_appends_nothing(
    stack: LocalStack, held_job: str, sec_workers: dict[str, str], worker_nc: NatsClient
) -> None:
    wid = sec_workers["sec1"]
    completed = ReportCompleted(job_id=held_job, attempt=1, result="forged")
    forged = signed_report(secrets.token_bytes(32).hex(), wid, completed)
    with pytest.raises(Unauthorized) as exc:
        await send(worker_nc, forged)
    assert reason(exc) == "bad_signature"
    # Altered in flight: signed by the worker, but another body.
    progress = ReportProgress(job_id=held_job, attempt=1, progress=0.5)
    genuine = signed_report(worker_credentials(stack, "sec1").hmac_secret_hex, wid, progress)
    tampered = (genuine[0], msgspec.json.encode(completed), genuine[2])
    with pytest.raises(Unauthorized) as exc:
        await send(worker_nc, tampered)
    assert reason(exc) == "bad_signature"
    history = await job_history(stack, held_job)
    assert "job.completed" not in [event_type(e) for e in history]


async def test_a_replayed_report_is_refused_and_appends_nothing(
    stack: LocalStack, held_job: str, sec_workers: dict[str, str], worker_nc: NatsClient
) -> None:
    creds = worker_credentials(stack, "sec1")
    progress = probe_report(held_job)
    report = signed_report(creds.hmac_secret_hex, creds.worker_id, progress)
    await send(worker_nc, report)
    with pytest.raises(Unauthorized) as exc:
        await send(worker_nc, report)  # the same bytes, the same nonce
    assert reason(exc) == "replayed_nonce"
    assert len(await probes_appended(stack, progress)) == 1


async def test_a_report_with_a_stale_timestamp_is_refused(
    stack: LocalStack, held_job: str, sec_workers: dict[str, str], worker_nc: NatsClient
) -> None:
    creds = worker_credentials(stack, "sec1")
    progress = probe_report(held_job)
    for skew_ms in (-61_000, 61_000):
        now_ms = time.time_ns() // 1_000_000 + skew_ms
        with pytest.raises(Unauthorized) as exc:
            await send(worker_nc, signed_report(creds.hmac_secret_hex, creds.worker_id, progress, now_ms=now_ms))
        assert reason(exc) == "stale_timestamp"
    assert not await probes_appended(stack, progress)


async def test_a_report_about_another_workers_job_is_refused(
    stack: LocalStack, held_job: str, sec_workers: dict[str, str], worker_nc: NatsClient, http: HttpClient
) -> None:
    # An enrolled worker of its own: valid credentials, but the job is sec1's.
    enrollment = await http.create_enrollment_token(ttl_s=60)
    SEEN_SECRETS.add(enrollment.enrollment_token)
    registered = await request(
        worker_nc, subjects.API_WORKERS_REGISTER,
        RegisterWorker(name="intruder", region="sec-nowhere", enrollment_token=enrollment.enrollment_token), Registered,
    )
    assert registered.credentials is not None
    intruder = registered.credentials
    SEEN_SECRETS.update({intruder.hmac_secret_hex, intruder.access_token, intruder.refresh_token})
    try:
        completed = ReportCompleted(job_id=held_job, attempt=1, result="stolen")
        with pytest.raises(StaleAttempt):
            await send(worker_nc, signed_report(intruder.hmac_secret_hex, intruder.worker_id, completed))
        # Nor can it speak on sec1's subject: the signature names the intruder.
        as_sec1 = signed_report(intruder.hmac_secret_hex, sec_workers["sec1"], completed, worker_id=intruder.worker_id)
        with pytest.raises(Forbidden) as exc:
            await send(worker_nc, as_sec1)
        assert reason(exc) == "worker_mismatch"
        # The enrollment token was spent.
        with pytest.raises(Unauthorized) as exc:
            await request(
                worker_nc, subjects.API_WORKERS_REGISTER,
                RegisterWorker(name="intruder2", region="sec-nowhere", enrollment_token=enrollment.enrollment_token),
                Registered,
            )
        assert reason(exc) == "already_used"
        assert "job.completed" not in [event_type(e) for e in await job_history(stack, held_job)]
    finally:
        await http.revoke_worker(intruder.worker_id)


async def test_a_forged_or_junk_chunk_never_reaches_a_stream_reader(
    stack: LocalStack, held_job: str, sec_workers: dict[str, str], http: HttpClient
) -> None:
    received: list[str] = []

    async def read() -> None:
        async for text in http.stream(held_job, timeout_s=120):
            received.append(text)

    reader = asyncio.create_task(read())
    # Another enrolled worker, with its own identity: it may publish on its own stream subjects only.
    token = (await http.create_enrollment_token(ttl_s=60)).enrollment_token
    intruder = (await enroll_over_nats(stack.worker_url, token, "intruder-stream", "sec-none")).credentials
    assert intruder is not None
    holder = worker_credentials(stack, "sec1")
    as_holder, as_intruder = [
        await connect(stack.worker_url, name=f"test-{c.worker_id}",
                      **bus.worker_options(c.worker_id, lambda c=c: bytes.fromhex(c.hmac_secret_hex)))
        for c in (holder, intruder)
    ]
    try:

        async def genuine_arrived() -> bool:
            # Sent until the reader's subscription is in place; repeats of offset 0 add nothing.
            forged = encoder.encode(StreamChunk(offset=0, text="FORGED"))
            await as_intruder.publish(subjects.stream_subject(intruder.worker_id, held_job), forged)
            await as_holder.publish(subjects.stream_subject(holder.worker_id, held_job), b"not a chunk")
            genuine = encoder.encode(StreamChunk(offset=0, text="genuine"))
            await as_holder.publish(subjects.stream_subject(holder.worker_id, held_job), genuine)
            return "genuine" in "".join(received)

        await wait_until(genuine_arrived, 20, "the holder's chunk to reach the reader")
        assert not reader.done(), "the junk chunk ended the stream"
        assert "".join(received) == "genuine"
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await as_holder.close()
        await as_intruder.close()
        await http.revoke_worker(intruder.worker_id)


async def test_a_worker_connection_cannot_publish_to_the_event_log(
    stack: LocalStack, held_job: str, sec_workers: dict[str, str]
) -> None:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    creds = worker_credentials(stack, "sec1")
    identity = bus.worker_options(creds.worker_id, lambda: bytes.fromhex(creds.hmac_secret_hex))
    nc = await nats.connect(stack.worker_url, error_cb=on_error, allow_reconnect=False, **identity)
    try:
        forged = {"type": "job.completed", "job_id": held_job, "worker_id": sec_workers["sec1"], "attempt": 1}
        refused = (subjects.job_subject(held_job), subjects.worker_subject("x"), "$KV.worker-config.x", "$KV.auth.x")
        for subject in refused:
            await nc.publish(subject, json.dumps(forged).encode())
        await nc.flush()

        async def refused_all() -> bool:
            return sum("permissions violation for publish" in e for e in errors) >= 4

        await wait_until(refused_all, 5, "the server to refuse every publish")
    finally:
        await nc.close()
    assert "job.completed" not in [event_type(e) for e in await job_history(stack, held_job)]


async def test_a_worker_reads_its_own_config_and_no_one_elses(
    stack: LocalStack, sec_workers: dict[str, str], worker_nc: NatsClient
) -> None:
    creds = worker_credentials(stack, "sec2")

    async def config_of(worker_id: str, *, signed: bool = True) -> WorkerConfigView:
        body = msgspec.json.encode(GetWorkerConfig(id=worker_id))
        secret = bytes.fromhex(creds.hmac_secret_hex)
        headers = sign(secret, subjects.API_WORKERS_CONFIG_GET, body, worker_id=creds.worker_id) if signed else None
        return await request(worker_nc, subjects.API_WORKERS_CONFIG_GET, body, WorkerConfigView, headers=headers)

    assert (await config_of(creds.worker_id)).worker_id == creds.worker_id
    with pytest.raises(Forbidden) as exc:
        await config_of(sec_workers["sec1"])
    assert reason(exc) == "worker_mismatch"
    with pytest.raises(Unauthorized) as exc:
        await config_of(creds.worker_id, signed=False)
    assert reason(exc) == "missing_header"


# --- Workers: rotation and revocation ------------------------------------------------------------------


async def test_a_worker_rotates_its_credentials_when_an_operator_asks(
    stack: LocalStack, held_job: str, sec_workers: dict[str, str], http: HttpClient
) -> None:
    wid = sec_workers["sec1"]
    before = worker_credentials(stack, "sec1")
    assert (await http.rotate_worker(wid)).status == "rotation_requested"

    async def rotated() -> bool:
        return worker_credentials(stack, "sec1").generation == before.generation + 1

    await wait_until(rotated, 20, "sec1 to rotate")
    after = worker_credentials(stack, "sec1")
    SEEN_SECRETS.update({before.hmac_secret_hex, after.hmac_secret_hex, after.access_token, after.refresh_token})
    assert after.hmac_secret_hex != before.hmac_secret_hex
    path = stack.data_dir / "workers" / "sec1" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    nc = await connect(stack.nats_url, name="test-inspect")
    try:
        raw = await read_subject(nc.jetstream(), subjects.WORKERS_STREAM, subjects.worker_subject(wid))
        events = [worker_event_decoder.decode(data) for data, _ in raw]
    finally:
        await nc.close()
    rotations = [e for e in events if isinstance(e, WorkerCredentialsRotated)]
    assert after.generation in [e.generation for e in rotations]

    # It keeps working, signing with the new secret: its progress reports land, and it stays online.
    async def reports_again() -> bool:
        history = await job_history(stack, held_job)
        return any(isinstance(e, JobProgress) and e.at_ms > rotations[-1].at_ms for e in history)

    await wait_until(reports_again, 10, "a progress report after the rotation")
    assert (await http.worker(wid)).status == "online"


async def test_a_revoked_workers_jobs_are_requeued(
    stack: LocalStack, revocable: dict[str, str], http: HttpClient
) -> None:
    job = await http.submit("echo", params={"sleep_s": 2}, region=REVOKE_REGION)

    async def running() -> bool:
        return (await http.get(job.id, min_seq=job.seq)).status == "running"

    await wait_until(running, 30, "the job to start")
    victim = (await http.get(job.id)).worker_id
    assert victim in revocable.values()
    assert (await http.revoke_worker(victim)).status == "revoked"

    done = await http.wait(job.id, timeout_s=40)
    assert (done.status, done.attempt) == ("completed", 2)
    assert done.worker_id not in (None, victim)
    history = await job_history(stack, job.id)
    assert [e.reason for e in history if isinstance(e, JobRequeued)] == ["worker_deregistered"]
    # Whatever the revoked worker still sends is refused: one completion, by the other worker.
    assert [e.worker_id for e in history if isinstance(e, JobCompleted)] == [done.worker_id]
    assert (await http.worker(victim)).status == "deregistered"

    async def refused_in_its_log() -> bool:
        # Its connection was closed; the reconnect is refused by the gateway's auth callout.
        log = (stack.logs / "gateway.log").read_text()
        return f"worker {victim} is revoked" in log

    await wait_until(refused_in_its_log, 10, "the revoked worker to be refused")


async def test_a_revoked_worker_stops_at_once_instead_of_reconnecting_forever(
    stack: LocalStack, http: HttpClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    region = "sec-refused"
    token = (await http.create_enrollment_token()).enrollment_token
    worker = Worker(
        stack.worker_url, name="refused", region=region, engines={"echo": EchoEngine()},
        state_dir=tmp_path / "worker", enrollment_token=token, drain_timeout_s=60, connect_wait_s=2,
    )
    await worker.start()
    job = await http.submit("echo", params={"sleep_s": 60}, region=region, timeout_s=120)
    try:
        async def running_here() -> bool:
            view = await http.get(job.id, min_seq=job.seq)
            return view.status == "running" and view.worker_id == worker.worker_id

        await wait_until(running_here, 30, "the job to run on the worker about to be revoked")
        await http.revoke_worker(worker.worker_id or "")
        # Its connection is closed and every reconnect refused: after `connect_wait_s` of refusals it gives
        # up, and its stop does not wait the 60 s drain for a job whose outcome it could not report.
        await asyncio.wait_for(worker.identity_refused.wait(), 20)
        started = time.monotonic()
        await worker.stop()
        assert time.monotonic() - started < 5
    finally:
        await worker.stop(drain=False)
        await http.cancel(job.id)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith(("worker", "sdk"))]
    # One line for the refused reconnects (not one per try, four a second), and one that says what to do.
    assert len([m for _, m in messages if "Authorization Violation" in m]) == 1
    [(level, why)] = [(lv, m) for lv, m in messages if "refused this worker's identity" in m]
    assert level == logging.ERROR and "enroll it again" in why


async def test_a_worker_rotates_on_schedule(fresh_nats: EmbeddedNats, tmp_path: Path) -> None:
    settings = AuthSettings(worker_credentials_max_age_s=1.0)
    async with serving_gateway(fresh_nats.url, fresh_nats.secrets_dir, settings=settings):
        nc = await connect(fresh_nats.url, name="test-platform")
        js = nc.jetstream()
        await ensure_streams(js)
        config = await js.key_value(subjects.WORKER_CONFIG_BUCKET)
        await config.put(subjects.WORKER_CONFIG_DEFAULTS_KEY, b'{"heartbeat_interval_s": 0.2}')
        async with open_admin(fresh_nats.url, fresh_nats.secrets_dir) as admin:
            token = (await admin.create_enrollment(CreateEnrollment(ttl_s=60))).enrollment_token
        worker = Worker(
            fresh_nats.address, name="rotating", region="r", engines={"echo": EchoEngine()},
            state_dir=tmp_path / "worker", enrollment_token=token,
        )
        try:
            async with worker:

                async def rotated_twice() -> bool:
                    return (worker.credentials_generation or 0) >= 3

                await wait_until(rotated_twice, 15, "two scheduled rotations")
                raw = await read_subject(js, subjects.WORKERS_STREAM, subjects.worker_subject(worker.worker_id or ""))
                generations = [e.generation for e in (worker_event_decoder.decode(d) for d, _ in raw)
                               if isinstance(e, WorkerCredentialsRotated)]
                assert generations[:2] == [2, 3]
                stored_file = tmp_path / "worker" / "credentials.json"
                stored = msgspec.json.decode(stored_file.read_bytes(), type=WorkerCredentials)
                assert stored.generation == worker.credentials_generation
                assert not any(stored.hmac_secret_hex.encode() in d for d, _ in raw)
        finally:
            await nc.close()


def signed_exchange(
    subject: str, payload: msgspec.Struct, creds: WorkerCredentials, inbox: str
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a request signed by `creds` with its answer going to `inbox`, as the
    worker's link sends it (a capture of what travelled)."""
    body = msgspec.json.encode(payload)
    return body, sign(bytes.fromhex(creds.hmac_secret_hex), subject, body, reply=inbox, worker_id=creds.worker_id)


async def exchange(nc: NatsClient, subject: str, body: bytes, headers: dict[str, str], inbox: str, reply_type: type) -> Any:
    """Publish a captured request as it was (same inbox) and decode the answer that comes back there."""
    sub = await nc.subscribe(inbox, max_msgs=1)
    await nc.publish(subject, body, reply=inbox, headers=headers)
    msg = await sub.next_msg(timeout=10)
    return decode_reply(msg, reply_type)


async def test_a_lost_rotate_reply_recovers_and_a_replay_is_refused_by_every_gateway_and_after_a_restart(
    fresh_nats: EmbeddedNats, tmp_path: Path
) -> None:
    secrets_dir = tmp_path / "secrets"
    nc = await connect(fresh_nats.url, name="test-worker")
    try:
        async with serving_gateway(fresh_nats.url, secrets_dir), serving_gateway(fresh_nats.url, secrets_dir):
            async with open_admin(fresh_nats.url, secrets_dir) as admin:
                token = (await admin.create_enrollment(CreateEnrollment(ttl_s=60))).enrollment_token
                registered = await request(
                    nc, subjects.API_WORKERS_REGISTER, RegisterWorker(name="rot", region="r", enrollment_token=token),
                    Registered,
                )
                old = registered.credentials
                assert old is not None
                wid = old.worker_id
                await admin.request_rotation(wid)

            async def heartbeat(creds: WorkerCredentials) -> HeartbeatAck:
                subject = subjects.heartbeat_request_subject(wid)
                body = msgspec.json.encode(Heartbeat(worker_id=wid, region="r"))
                headers = sign(bytes.fromhex(creds.hmac_secret_hex), subject, body, worker_id=wid)
                return await request(nc, subject, body, HeartbeatAck, headers=headers)

            # The worker asks for its next generation; the answer is lost on the way.
            rotate, inbox = subjects.rotate_subject(wid), nc.new_inbox()
            body, headers = signed_exchange(rotate, RotateCredentials(), old, inbox)
            lost = await exchange(nc, rotate, body, headers, inbox, WorkerCredentials)
            SEEN_SECRETS.update({old.hmac_secret_hex, lost.hmac_secret_hex})

            # A capture of that request, sent again to whichever gateway answers, is refused every time,
            # and sent with the answer redirected elsewhere it does not even verify.
            for _ in range(6):
                with pytest.raises(Unauthorized) as exc:
                    await exchange(nc, rotate, body, headers, inbox, WorkerCredentials)
                assert reason(exc) == "replayed_nonce"
            with pytest.raises(Unauthorized) as exc:
                await exchange(nc, rotate, body, headers, nc.new_inbox(), WorkerCredentials)
            assert reason(exc) == "bad_signature"

            # The worker still signs with the old secret: it is told to rotate again, and gets the same
            # generation; its first request with it makes it current.
            assert (await heartbeat(old)).rotate
            again_body, again_headers = signed_exchange(rotate, RotateCredentials(), old, inbox)
            again = await exchange(nc, rotate, again_body, again_headers, inbox, WorkerCredentials)
            assert (again.generation, again.hmac_secret_hex) == (lost.generation, lost.hmac_secret_hex)
            assert await heartbeat(again) == HeartbeatAck(registered=True, rotate=False)

        # Both gateways stopped; a new one starts: the capture is still refused.
        async with serving_gateway(fresh_nats.url, secrets_dir):
            with pytest.raises(Unauthorized) as exc:
                await exchange(nc, rotate, again_body, again_headers, inbox, WorkerCredentials)
            assert reason(exc) == "replayed_nonce"
            raw = await read_subject(nc.jetstream(), subjects.WORKERS_STREAM, subjects.worker_subject(wid))
            rotations = [e for e in (worker_event_decoder.decode(d) for d, _ in raw) if isinstance(e, WorkerCredentialsRotated)]
            assert [e.generation for e in rotations] == [2]
    finally:
        await nc.close()


async def test_an_endpoint_runs_a_bounded_number_of_handlers_and_leaves_the_others_free(
    fresh_nats: EmbeddedNats,
) -> None:
    async with platform_nc(fresh_nats, "test-gateway") as nc:
        js = nc.jetstream()
        async with await Credentials.open(js, secrets.token_bytes(32)) as credentials:
            gateway = Gateway(nc, credentials)
            await gateway.start()
            api = NatsApi(gateway, max_in_flight=1)
            await api.start()
            try:
                _, api_key = await credentials.create_api_key("flood", "client")
                token = (await credentials.issue_tokens(api_key)).access_token
                job = await request(nc, subjects.API_JOBS_SUBMIT, SubmitJob(type="echo"), Submitted, headers=bearer(token))
                loop = asyncio.get_running_loop()
                started = loop.time()

                async def long_poll() -> float:
                    with pytest.raises(Timeout):
                        await request(
                            nc, subjects.API_JOBS_WAIT, WaitJob(id=job.id, timeout_s=1), JobView,
                            headers=bearer(token), timeout_s=10,
                        )
                    return loop.time() - started

                async def sign_in() -> float:
                    await asyncio.sleep(0.2)  # while the first long poll holds the endpoint's one slot
                    with pytest.raises(Unauthorized):
                        await request(nc, subjects.API_AUTH_TOKEN, IssueTokens(api_key=f"{api_key}x"), TokenPair)
                    return loop.time() - started

                first, second, other = await asyncio.gather(long_poll(), long_poll(), sign_in())
                # One long poll at a time on `api.jobs.wait`; `api.auth.token` answers meanwhile.
                assert sorted([first, second])[1] >= 2.0
                assert other < 1.0
            finally:
                await api.stop()
                await gateway.stop()


# --- Secrets stay secret ---------------------------------------------------------------------------------


async def test_secrets_never_appear_in_logs_or_the_event_log(
    stack: LocalStack, client: Client, http: HttpClient
) -> None:
    """Hands out a secret of each kind itself (an API key, a token pair and its refresh, an enrollment
    token, a worker's credentials) and uses them, so it needs no other test; whatever the module's tests
    that ran before it handed out (SEEN_SECRETS) is looked for too."""
    key = await new_key(http, "secrets")
    async with httpx.AsyncClient(base_url=stack.http_url) as raw:
        issued = (await raw.post("/api/v1/auth/token", json={"api_key": key.api_key})).json()
        refreshed = (await raw.post("/api/v1/auth/refresh", json={"refresh_token": issued["refresh_token"]})).json()
    SEEN_SECRETS.update({issued["access_token"], issued["refresh_token"], refreshed["access_token"],
                         refreshed["refresh_token"]})
    async with HttpClient(stack.http_url, api_key=key.api_key) as holder:
        job = await holder.submit("echo", params={"keep": "quiet"})
        assert (await holder.wait(job.id, timeout_s=30)).status == "completed"
    token = (await http.create_enrollment_token(ttl_s=60)).enrollment_token
    enrolled = (await enroll_over_nats(stack.worker_url, token, "secret-keeper", "sec-secrets")).credentials
    assert enrolled is not None
    SEEN_SECRETS.update({token, enrolled.hmac_secret_hex, enrolled.access_token, enrolled.refresh_token})
    await http.revoke_worker(enrolled.worker_id)
    await client.list()
    await http.list()
    found = set(SEEN_SECRETS) | {stack.operator_key or "", client.auth.access_token or "", http.auth.access_token or ""}
    found |= {line.partition("=")[2] for line in (stack.secrets_dir / "nats.env").read_text().splitlines()}
    found.add((stack.secrets_dir / "master.key").read_bytes().hex())
    for path in (stack.data_dir / "workers").glob("*/credentials.json"):
        creds = msgspec.json.decode(path.read_bytes(), type=WorkerCredentials)
        found |= {creds.hmac_secret_hex, creds.access_token, creds.refresh_token}
    found |= {child.env.get("GPU_WORKER_ENROLLMENT_TOKEN", "") for child in stack.children.values()}
    found.discard("")
    assert len(found) > 10

    logs = {path.name: path.read_bytes() for path in stack.logs.glob("*.log")}
    assert {"gateway.log", "nats-server.log", "worker-w1.log"} <= set(logs)
    nc = await connect(stack.nats_url, name="test-inspect")
    try:
        js = nc.jetstream()
        streams = {name: await _all_messages(js, name) for name in (subjects.JOBS_STREAM, subjects.WORKERS_STREAM)}
    finally:
        await nc.close()
    assert streams[subjects.JOBS_STREAM] and streams[subjects.WORKERS_STREAM]
    for secret in found:
        for name, data in logs.items():
            assert secret.encode() not in data, f"a secret is in {name}"
        for name, data in streams.items():
            assert secret.encode() not in data, f"a secret is in the {name} stream"


async def _all_messages(js: JetStreamContext, stream: str) -> bytes:
    """Every message of `stream`, concatenated (headers too)."""
    last = (await js.stream_info(stream)).state.last_seq
    chunks: list[bytes] = []
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        chunks.append(msg.data + repr(msg.headers).encode())
        if msg.metadata.sequence.stream >= last:
            done.set()

    sub = await js.subscribe(">", stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL, cb=on_msg)
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await sub.unsubscribe()
    return b"\n".join(chunks)
