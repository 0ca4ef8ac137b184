"""Webhooks: signatures and their check, the retry schedule, the target policy, and deliveries end to end
(a receiver on localhost, a gateway on a real nats-server, restarted in the middle)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from gateway.webhooks import WebhookSettings, backoff_s, check_target, check_url
from sdk import subjects
from sdk.broker import EmbeddedNats, free_port
from sdk.errors import BadRequest
from sdk.events import JobCancelled, JobSubmitted, event_type
from sdk.http import HttpClient
from sdk.log import append
from sdk.webhooks import InvalidWebhook, signature, verify_webhook
from tests.conftest import platform_nc, serving_gateway, wait_until
from tests.test_security_e2e import bearer, operator_key

BODY = b'{"id":"job-1","status":"completed"}'


# --- Signatures ----------------------------------------------------------------------------------


def test_a_signed_body_verifies_and_any_change_is_refused() -> None:
    now = int(time.time())
    headers = {"gf-signature": signature("whsec_a", BODY, now)}
    verify_webhook("whsec_a", headers, BODY)
    verify_webhook(["whsec_old", "whsec_a"], headers, BODY)  # during a rotation, either secret
    for secret, body, hdrs in [
        ("whsec_b", BODY, headers),
        ("whsec_a", BODY.replace(b"completed", b"failed"), headers),
        ("whsec_a", BODY, {}),
        ("whsec_a", BODY, {"Gf-Signature": f"t={now + 1},v1=" + headers["gf-signature"].split("v1=")[1]}),
        ("whsec_a", BODY, {"Gf-Signature": "v1=abc"}),
    ]:
        with pytest.raises(InvalidWebhook):
            verify_webhook(secret, hdrs, body)


def test_a_signature_older_than_five_minutes_is_refused() -> None:
    signed_at = int(time.time()) - 301
    headers = {"Gf-Signature": signature("whsec_a", BODY, signed_at)}
    with pytest.raises(InvalidWebhook, match="ago"):
        verify_webhook("whsec_a", headers, BODY)
    verify_webhook("whsec_a", headers, BODY, now_s=signed_at + 299)


# --- Retry schedule and targets ------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    settings = WebhookSettings(first_delay_s=5, max_delay_s=60)
    assert [backoff_s(n, settings, 0.5) for n in (1, 2, 3, 4, 5, 6)] == [5, 10, 20, 40, 60, 60]
    assert backoff_s(1, settings, 0.0) == 2.5 and backoff_s(1, settings, 0.999) < 7.5


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/hook", "http://10.1.2.3/", "http://169.254.169.254/latest/meta-data", "http://[::1]:8080/"]
)
async def test_private_loopback_and_link_local_targets_are_refused_outside_dev(url: str) -> None:
    with pytest.raises(BadRequest) as refused:
        await check_target(url, allow_private=False)
    assert refused.value.details["reason"] == "private_target"
    await check_target(url, allow_private=True)


async def test_only_http_targets_with_a_host() -> None:
    for url in ("ftp://example.com/x", "http:///path", "file:///etc/passwd", "http://[::1", "http://a:99999/"):
        with pytest.raises(BadRequest):
            await check_target(url, allow_private=True)


def test_a_submission_is_checked_by_name_alone() -> None:
    for url in ("http://127.0.0.1:8000/h", "http://localhost/h", "http://[fe80::1]/", "http://192.168.0.10/"):
        with pytest.raises(BadRequest, match="not a public address"):
            check_url(url, allow_private=False)
    assert check_url("https://hooks.example.com/x", allow_private=False) == "hooks.example.com"


def test_private_targets_follow_the_environment() -> None:
    assert WebhookSettings.from_env({"GF_ENV": "test"}).allow_private
    assert not WebhookSettings.from_env({"GF_ENV": "production"}).allow_private
    assert WebhookSettings.from_env({}).retry_for_s == 86400
    assert WebhookSettings.from_env({"GF_WEBHOOK_FIRST_DELAY_S": "0.5"}).first_delay_s == 0.5


# --- End to end ----------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A webhook endpoint on localhost that answers the statuses it is given, then 200."""

    statuses: list[int] = field(default_factory=list)
    received: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.received.append((time.monotonic(), headers, body))
        status = self.statuses.pop(0) if self.statuses else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = Receiver()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: _started(server), 10, "the receiver")
    app.url = f"http://127.0.0.1:{port}/hook"
    yield app
    server.should_exit = True
    await task


async def _started(server: uvicorn.Server) -> bool:
    return server.started


@pytest.fixture
def webhook_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test environment (localhost targets allowed) with retries seconds apart."""
    monkeypatch.setenv("GF_ENV", "test")
    monkeypatch.setenv("GF_WEBHOOK_FIRST_DELAY_S", "1.5")


async def history(http: HttpClient, job_id: str) -> list[Any]:
    return [r.event for r in await http.events(job_id) if event_type(r.event).startswith("job.webhook")]


@pytest.mark.slow
async def test_receiver_verifies_the_signed_job_view_and_redelivery_sends_it_again(
    fresh_nats: EmbeddedNats, receiver: Receiver, webhook_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving_gateway(fresh_nats.url, fresh_nats.secrets_dir) as url:
        async with HttpClient(url, api_key=await operator_key(fresh_nats)) as operator:
            key = (await operator.create_api_key("hooks")).api_key
        async with HttpClient(url, api_key=key) as http, httpx.AsyncClient(base_url=url) as raw:
            job = await http.submit("echo", webhook_url=receiver.url)  # no scheduler: it stays queued
            await http.cancel(job.id, reason="done with it")
            await wait_until(lambda: _count(receiver, 1), 20, "the webhook")
            headers = bearer(http.auth.access_token)
            secret = (await raw.post("/api/v1/webhooks/secret", json={}, headers=headers)).json()
            _, received_headers, body = receiver.received[0]
            verify_webhook(secret["secret"], received_headers, body)
            view = json.loads(body)
            assert (view["id"], view["status"]) == (job.id, "cancelled")

            async def recorded() -> bool:
                return len(await history(http, job.id)) == 1

            await wait_until(recorded, 10, "the delivery in the job's events")
            (delivered,) = await history(http, job.id)
            assert (event_type(delivered), delivered.status_code, delivered.attempt) == ("job.webhook_delivered", 200, 1)

            redeliver = await raw.post(f"/api/v1/jobs/{job.id}/webhook/redeliver", headers=headers)
            assert redeliver.status_code == 202
            await wait_until(lambda: _count(receiver, 2), 20, "the redelivery")
            verify_webhook(secret["secret"], receiver.received[1][1], receiver.received[1][2])

            rotated = (await raw.post("/api/v1/webhooks/secret", json={"rotate": True}, headers=headers)).json()
            assert rotated["generation"] == secret["generation"] + 1 and rotated["secret"] != secret["secret"]

            queued = await http.submit("echo", webhook_url=receiver.url)
            early = await raw.post(f"/api/v1/jobs/{queued.id}/webhook/redeliver", headers=headers)
            assert early.status_code == 409, "a job that has not ended has nothing to deliver yet"
            monkeypatch.setenv("GF_ENV", "production")
            with pytest.raises(BadRequest, match="not a public address"):
                await http.submit("echo", webhook_url=receiver.url)
            for name in ("localhost", "127.0.0.1", "169.254.169.254"):
                with pytest.raises(BadRequest, match="not a public address"):
                    await http.submit("echo", webhook_url=f"http://{name}/hook")


@pytest.mark.slow
async def test_receiver_failing_twice_gets_the_third_delivery_across_a_gateway_restart(
    fresh_nats: EmbeddedNats, receiver: Receiver, webhook_env: None
) -> None:
    receiver.statuses = [503, 500]
    key_source = await operator_key(fresh_nats)
    async with serving_gateway(fresh_nats.url, fresh_nats.secrets_dir) as url:
        async with HttpClient(url, api_key=key_source) as http:
            job = await http.submit("echo", webhook_url=receiver.url)
            await http.cancel(job.id)
            await wait_until(lambda: _count(receiver, 2), 30, "two failed tries")
    # The gateway is down between the second try and the third: the consumer keeps the trigger.
    restarted_at = time.monotonic()
    async with serving_gateway(fresh_nats.url, fresh_nats.secrets_dir) as url:
        async with HttpClient(url, api_key=key_source) as http:
            await wait_until(lambda: _count(receiver, 3), 30, "the third try")

            async def recorded() -> bool:
                return len(await history(http, job.id)) == 3

            await wait_until(recorded, 10, "three tries in the job's events")
            tries = await history(http, job.id)
    assert receiver.received[2][0] > restarted_at, "the third try came from the restarted gateway"
    assert [(event_type(e), e.attempt, e.status_code) for e in tries] == [
        ("job.webhook_failed", 1, 503), ("job.webhook_failed", 2, 500), ("job.webhook_delivered", 3, 200),
    ]
    assert tries[0].retry_in_s is not None and tries[0].reason == "answered 503"
    assert tries[1].retry_in_s >= 1.5, "the delay doubles: 1.5 s x 2 x jitter (0.5 to 1.5)"
    assert [json.loads(body)["id"] for _, _, body in receiver.received] == [job.id] * 3
    assert len(receiver.received) == 3, "delivered once it succeeded, not again"


@pytest.mark.slow
async def test_a_store_from_before_the_pushed_consumer_keeps_its_triggers(
    fresh_nats: EmbeddedNats, receiver: Receiver, webhook_env: None
) -> None:
    """Older gateways left the webhook consumer as a pull consumer: the gateway makes it again as the
    pushed one, from where the old one stopped, so a job that ended in between still gets its webhook."""
    async with serving_gateway(fresh_nats.url, fresh_nats.secrets_dir) as url:
        async with HttpClient(url, api_key=await operator_key(fresh_nats)) as operator:
            key = await operator.create_api_key("hooks")
    async with platform_nc(fresh_nats) as nc:
        js = nc.jetstream()
        await js.delete_consumer(subjects.JOBS_STREAM, subjects.WEBHOOK_CONSUMER)
        await js.add_consumer(subjects.JOBS_STREAM, ConsumerConfig(
            durable_name=subjects.WEBHOOK_CONSUMER, filter_subject=subjects.JOBS_SUBJECTS,
            deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.EXPLICIT,
        ))
        # A job that ends while no gateway runs.
        submitted = JobSubmitted(job_id="j-older", job_type="echo", owner=key.key_id, webhook_url=receiver.url)
        await append(js, subjects.job_subject("j-older"), submitted, expected_seq=0)
        await append(js, subjects.job_subject("j-older"), JobCancelled(job_id="j-older"))
        async with serving_gateway(fresh_nats.url, fresh_nats.secrets_dir):
            await wait_until(lambda: _count(receiver, 1), 20, "the webhook of the job that ended in between")
            info = await js.consumer_info(subjects.JOBS_STREAM, subjects.WEBHOOK_CONSUMER)
    assert [json.loads(body)["id"] for _, _, body in receiver.received] == ["j-older"]
    assert info.config.deliver_subject == subjects.WEBHOOK_DELIVER_SUBJECT


async def _count(receiver: Receiver, n: int) -> bool:
    return len(receiver.received) >= n
