"""Direct sessions end to end: a platform with several workers in two regions, every component a real
process. A client leases a worker's slot, talks to it over NATS (or through the gateway's relay), and
the opening and closing are in the log; tokens are checked by the worker alone."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.auth import load_or_create_master_key
from gateway.auth.master_key import session_signing_key
from sdk import subjects
from sdk.client import Client
from sdk.connection import request
from sdk.direct import DirectRequest, DirectResult, SessionClaims, sign_token
from sdk.errors import JobError, NoWorkerAvailable, SessionEnded, SessionNotFound, TokenRefused
from sdk.events import DirectSessionClosed, DirectSessionOpened, now_ms, session_event_decoder
from sdk.http import HttpClient
from sdk.local import LocalStack
from sdk.log import read_subject
from tests.conftest import running_stack, wait_until

pytestmark = pytest.mark.slow

#: name -> (region, engines): two echo workers in two regions, and one that also runs the LLM engine.
WORKERS = {"eu-1": ("eu-west", "echo"), "us-1": ("us-east", "echo"), "llm-1": ("eu-west", "echo,llm")}


async def online(operator: HttpClient, names: set[str]) -> bool:
    try:
        return {w.name for w in await operator.workers() if w.status == "online" and w.last_heartbeat} >= names
    except Exception:
        return False


@pytest.fixture(scope="module")
async def platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with running_stack(tmp_path_factory.mktemp("direct"), []) as stack:
        for name, (region, engines) in WORKERS.items():
            stack.start_worker(name, region, "--engines", engines)
        async with HttpClient(stack.http_url, api_key=stack.operator_key) as operator:
            await wait_until(lambda: online(operator, set(WORKERS)), 90, f"workers {sorted(WORKERS)}")
        yield stack


@pytest.fixture
async def operator(platform: LocalStack) -> AsyncIterator[HttpClient]:
    async with HttpClient(platform.http_url, api_key=platform.operator_key) as http:
        yield http


@pytest.fixture
async def api_key(operator: HttpClient) -> str:
    return (await operator.create_api_key(f"direct-{secrets.token_hex(3)}")).api_key


@pytest.fixture
async def client(platform: LocalStack, api_key: str) -> AsyncIterator[Client]:
    """A client over NATS, as its own identity (the auth callout's permissions apply)."""
    async with await Client.connect(platform.client_url, api_key=api_key) as nats_client:
        yield nats_client


async def worker_ids(operator: HttpClient) -> dict[str, str]:
    return {w.name: w.id for w in await operator.workers() if w.status == "online"}


async def session_events(client: Client | HttpClient, platform: LocalStack, session_id: str) -> list[object]:
    async with await Client.connect(platform.nats_url) as platform_client:
        raw = await read_subject(platform_client.nc.jetstream(), subjects.SESSIONS_STREAM, subjects.session_subject(session_id))
    return [session_event_decoder.decode(data) for data, _ in raw]


async def test_echo_session_end_to_end_over_nats_and_the_relay(
    platform: LocalStack, client: Client, api_key: str, operator: HttpClient
) -> None:
    ids = await worker_ids(operator)
    async with client.direct("echo", region="us-east", region_policy="strict", ttl_s=60) as session:
        view = session.view
        assert (view.worker_id, view.region, view.subject) == (ids["us-1"], "us-east", f"direct.{ids['us-1']}")
        assert view.expires_at_ms > now_ms() + 50_000
        assert await session.run({"hello": "world"}) == {"hello": "world"}
        assert [piece async for piece in session.stream({"chunks": ["a", "b"]})] == ["a", "b"]
        with pytest.raises(JobError) as failed:
            await session.run({"fail": "on purpose"})
        assert failed.value.details == {"code": "echo_failed"}
        async with HttpClient(platform.http_url, api_key=api_key) as http:
            token = (await http.auth.headers())["Authorization"]
        async with httpx.AsyncClient(base_url=platform.http_url, headers={"Authorization": token}) as raw:
            relayed = await raw.post(f"/api/v1/direct/sessions/{view.session_id}/run", json={"params": {"via": "gateway"}})
            assert (relayed.status_code, relayed.json()) == (200, {"result": {"via": "gateway"}})
    assert session.closed is not None
    assert (session.closed.reason, session.closed.requests, session.closed.errors) == ("closed", 4, 1)

    opened, closed = await session_events(client, platform, view.session_id)
    assert isinstance(opened, DirectSessionOpened) and isinstance(closed, DirectSessionClosed)
    assert (opened.worker_id, opened.region, opened.job_type, opened.expires_at_ms) == (
        ids["us-1"], "us-east", "echo", view.expires_at_ms,
    )
    assert opened.owner == closed.closed_by
    assert (closed.reason, closed.requests, closed.tokens, closed.errors) == ("closed", 4, 0, 1)

    # The token of a closed session is refused by the worker itself, with a clear error.
    with pytest.raises(SessionEnded, match="closed"):
        await request(client.nc, view.subject, DirectRequest(token=view.token, params={}), DirectResult)
    # Closing again answers how it ended; the relay says the session is over (410).
    assert (await session.close()).reason == "closed"
    async with httpx.AsyncClient(base_url=platform.http_url, headers={"Authorization": token}) as raw:
        response = await raw.post(f"/api/v1/direct/sessions/{view.session_id}/run", json={"params": {}})
        assert (response.status_code, response.json()["code"]) == (410, "session_ended")


async def test_llm_session_streams_and_counts_tokens(client: Client, tiny_gpt2: Path, operator: HttpClient) -> None:
    model = str(tiny_gpt2)
    async with client.direct("llm", model=model, ttl_s=120) as session:
        assert session.view.worker_id == (await worker_ids(operator))["llm-1"], "only llm-1 runs the LLM engine"
        result = await session.run({"prompt": "hello world", "max_new_tokens": 6})
        assert isinstance(result["text"], str) and 0 < result["completion_tokens"] <= 6
        pieces = [piece async for piece in session.stream({"prompt": "once upon", "max_new_tokens": 8})]
        assert pieces and all(isinstance(piece, str) for piece in pieces)
    assert session.closed is not None
    assert session.closed.requests == 2 and session.closed.errors == 0
    assert session.closed.tokens is not None and session.closed.tokens > result["completion_tokens"]


async def test_tokens_are_checked_by_the_worker_alone(platform: LocalStack, client: Client, operator: HttpClient) -> None:
    ids = await worker_ids(operator)
    async with client.direct("echo", region="eu-west", region_policy="strict") as session:
        view = session.view
        other = next(worker_id for name, worker_id in ids.items() if worker_id != view.worker_id and name != "llm-1")

        async def refused(subject: str, token: str) -> str:
            with pytest.raises(TokenRefused) as exc:
                await request(client.nc, subject, DirectRequest(token=token, params={}), DirectResult)
            return exc.value.details["reason"]

        # A token on a worker it was not issued for.
        assert await refused(subjects.direct_subject(other), view.token) == "wrong_worker"
        # Signed with another key, or altered after signing.
        claims = SessionClaims(
            session_id=view.session_id, worker_id=view.worker_id, expires_at_ms=view.expires_at_ms, job_type="echo"
        )
        assert await refused(view.subject, sign_token(Ed25519PrivateKey.generate(), claims)) == "signature"
        forged_claims = msgspec.structs.replace(claims, expires_at_ms=claims.expires_at_ms + 10**9)
        prefix, _, signature = view.token.split(".")
        forged = f"{prefix}.{sign_token(Ed25519PrivateKey.generate(), forged_claims).split('.')[1]}.{signature}"
        assert await refused(view.subject, forged) == "signature"
        assert await refused(view.subject, "not-a-token") == "malformed"
        # Signed by the platform's own key (from its master key), but expired.
        platform_key = session_signing_key(load_or_create_master_key(platform.data_dir / "secrets" / "master.key"))
        expired = msgspec.structs.replace(claims, expires_at_ms=now_ms() - 1)
        assert await refused(view.subject, sign_token(platform_key, expired)) == "expired"
        # Bad input: a structured error, never silence.
        reply = await client.nc.request(view.subject, b"{not json", timeout=5)
        assert reply.headers is not None and reply.headers[subjects.ERROR_HEADER] == "bad_request"
        assert await session.run({"still": "fine"}) == {"still": "fine"}


async def test_a_session_holds_a_slot_of_its_worker(platform: LocalStack, client: Client, operator: HttpClient) -> None:
    us = (await worker_ids(operator))["us-1"]
    await operator.set_worker_config(us, {"max_concurrency": 1})
    try:
        async with client.direct("echo", region="us-east", region_policy="strict") as session:
            assert session.view.worker_id == us
            job = await client.submit("echo", params={"n": 1}, region="us-east", region_policy="strict")
            explained = await client.placement(job.id)
            assert explained.status == "queued", explained
            assert {r.reason: r.workers for r in explained.reasons}["busy 1/1"] == 1, explained
            with pytest.raises(NoWorkerAvailable) as refused:
                await client.direct("echo", region="us-east", region_policy="strict").open()
            reasons = {r["reason"]: r["workers"] for r in refused.value.details["reasons"]}
            assert reasons["busy 1/1"] == 1
        done = await client.wait(job.id, timeout_s=30)  # the closed session's slot went to the job
        assert (done.status, done.worker_id) == ("completed", us)
    finally:
        await operator.set_worker_config(us, {"max_concurrency": None})


async def test_sessions_end_with_their_worker(platform: LocalStack, client: Client, operator: HttpClient) -> None:
    """A lost worker's session ends (`worker_lost`) and its client gets a clear error; a draining
    worker's ends with its usage (`worker_draining`). Another session opens elsewhere."""
    for name in ("lost-1", "drain-1"):
        platform.start_worker(name, "ap-south", "--engines", "echo")
    await wait_until(lambda: online(operator, {"lost-1", "drain-1"}), 60, "the ap-south workers")
    ids = await worker_ids(operator)
    sessions = {}
    for name in ("lost-1", "drain-1"):
        await operator.set_worker_config(ids[name], {"max_concurrency": 1})  # one session each, in turn
    for _ in range(2):
        session = client.direct("echo", region="ap-south", region_policy="strict")
        view = await session.open()
        assert await session.run({"i": 1}) == {"i": 1}
        sessions[view.worker_id] = session
    assert set(sessions) == {ids["lost-1"], ids["drain-1"]}

    platform.children["worker-lost-1"].kill()
    platform.children["worker-drain-1"].stop()  # SIGTERM: the worker drains
    for name, reason, usage in (("lost-1", "worker_lost", None), ("drain-1", "worker_draining", 1)):
        session = sessions[ids[name]]
        with pytest.raises(SessionEnded):
            await session.run({"i": 2}, timeout_s=5)

        async def ended(session_id: str = session.view.session_id) -> bool:
            return len(await session_events(client, platform, session_id)) == 2

        await wait_until(ended, 30, f"the session on {name} to end")
        closed = (await session_events(client, platform, session.view.session_id))[1]
        assert isinstance(closed, DirectSessionClosed)
        assert (closed.reason, closed.requests, closed.closed_by) == (reason, usage, None)
    async with client.direct("echo", region="ap-south") as elsewhere:
        assert elsewhere.view.worker_id not in sessions and await elsewhere.run({"ok": 1}) == {"ok": 1}


async def test_bad_input_and_other_clients_sessions_are_4xx(
    platform: LocalStack, client: Client, operator: HttpClient
) -> None:
    async with HttpClient(platform.http_url, api_key=(await operator.create_api_key("direct-other")).api_key) as other:
        token = (await other.auth.headers())["Authorization"]
    async with httpx.AsyncClient(base_url=platform.http_url, headers={"Authorization": token}) as raw:
        for body in (
            {"type": "nope"}, {"type": "llm"}, {"type": "echo", "ttl_s": 0}, {"type": "echo", "extra": 1},
            {"type": "echo", "region_policy": "strict"}, {"type": "image", "model": "m"}, [],
        ):
            response = await raw.post("/api/v1/direct/sessions", json=body)
            assert (response.status_code, response.json()["code"]) == (400, "bad_request"), body
        response = await raw.post("/api/v1/direct/sessions", json={"type": "echo", "region": "mars", "region_policy": "strict"})
        assert (response.status_code, response.json()["code"]) == (409, "no_worker_available")
        reasons = [r["reason"] for r in response.json()["details"]["reasons"]]
        assert any(r.startswith("region ") and r.endswith("is not mars (strict)") for r in reasons), reasons

        async with client.direct("echo") as mine:
            for method, path in (("POST", "run"), ("DELETE", "")):
                url = f"/api/v1/direct/sessions/{mine.view.session_id}/{path}".rstrip("/")
                response = await raw.request(method, url, json={"params": {}} if path else None)
                assert (response.status_code, response.json()["code"]) == (404, "session_not_found"), method
            response = await raw.post(f"/api/v1/direct/sessions/{mine.view.session_id}/run", json={"params": 1})
            assert response.status_code == 400
            response = await raw.delete("/api/v1/direct/sessions/bad id")
            assert response.status_code in (400, 404)
            assert await mine.run({"untouched": True}) == {"untouched": True}
        with pytest.raises(SessionNotFound):
            await client.close_session("nosuchsession")
    # An operator may close anyone's session.
    view = await client.direct("echo").open()
    closed = await operator.close_session(view.session_id)
    assert (closed.session_id, closed.reason, closed.requests) == (view.session_id, "closed", 0)
