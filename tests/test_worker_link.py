"""The worker's link to the platform, against a real nats-server: a report nobody answers yet is retried with
backoff until the gateway answers (one log line per attempt, not a tight loop), and a refusal is raised at
once, never retried. The "gateway" here is a plain responder on the report subject."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.msg import Msg

from sdk import subjects
from sdk.api import Accepted, ReportDraining, ReportStarted
from sdk.broker import EmbeddedNats
from sdk.connection import connect, error_reply
from sdk.errors import StaleAttempt
from worker.link import PlatformLink


@pytest.fixture
async def link(nats_server: EmbeddedNats) -> AsyncIterator[PlatformLink]:
    platform_link = PlatformLink(nats_url=nats_server.url, name="link-test", tls=None, connect_wait_s=5.0)
    await platform_link.connect()
    platform_link.worker_id = f"w-{uuid.uuid4().hex[:12]}"
    yield platform_link
    await platform_link.close()


async def test_an_unanswered_report_is_retried_with_backoff_until_the_gateway_answers(
    link: PlatformLink, nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker.link")
    assert link.worker_id is not None
    subject = subjects.report_subject(link.worker_id)
    received: list[bytes] = []
    gateway = await connect(nats_server.url, name="late-gateway")

    async def answer(msg: Msg) -> None:
        received.append(msg.data)
        await msg.respond(msgspec.json.encode(Accepted(seq=7)))

    async def come_up_late() -> None:
        await asyncio.sleep(1.0)
        await gateway.subscribe(subject, cb=answer)
        await gateway.flush()

    late = asyncio.create_task(come_up_late())
    try:
        accepted = await link.report(ReportDraining(), retry_for_s=30.0)
    finally:
        await late
        await gateway.close()
    assert accepted == Accepted(seq=7)
    assert len(received) == 1
    # "Nobody answers" comes back at once: without backoff (0.1s, doubling) this would be hundreds of tries.
    unanswered = [r.getMessage() for r in caplog.records if r.name == "worker.link"]
    assert 2 <= len(unanswered) <= 7, unanswered
    assert all(line.startswith(f"{subject}: nobody answers {subject} (attempt ") for line in unanswered)


async def test_a_refused_report_is_raised_at_once_and_never_retried(
    link: PlatformLink, nats_server: EmbeddedNats
) -> None:
    assert link.worker_id is not None
    received: list[bytes] = []
    gateway = await connect(nats_server.url, name="refusing-gateway")

    async def refuse(msg: Msg) -> None:
        received.append(msg.data)
        # As the gateway answers (sdk.endpoints): the ErrorReply body, marked as an error by its headers.
        body, headers = error_reply(StaleAttempt("attempt 1 is not current"))
        await gateway.publish(msg.reply, body, headers=headers)

    await gateway.subscribe(subjects.report_subject(link.worker_id), cb=refuse)
    await gateway.flush()
    try:
        with pytest.raises(StaleAttempt) as refused:
            await link.report(ReportStarted(job_id="j-1", attempt=1), retry_for_s=30.0)
    finally:
        await gateway.close()
    assert refused.value.message == "attempt 1 is not current"
    assert len(received) == 1


async def test_a_connection_the_client_gave_up_on_is_reported_once_and_a_close_asked_for_is_not(
    nats_server: EmbeddedNats,
) -> None:
    lost: list[str] = []
    link = PlatformLink(nats_url=nats_server.url, name="lost-test", tls=None, connect_wait_s=5.0)
    link.on_connection_lost = lambda: lost.append("lost")
    await link.connect()
    # What nats-py does when an error inside a reconnect makes it give up: it closes the client itself.
    assert link._nc is not None
    await link._nc.close()
    assert lost == ["lost"]

    asked = PlatformLink(nats_url=nats_server.url, name="closed-test", tls=None, connect_wait_s=5.0)
    asked.on_connection_lost = lambda: lost.append("asked")
    await asked.connect()
    await asked.close()
    assert lost == ["lost"]
