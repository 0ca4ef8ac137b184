"""The endpoint server of `api.>` and `proj.>` (`sdk.endpoints`) and the typed request over it
(`sdk.connection.request`), against a real nats-server."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from sdk import subjects
from sdk.connection import request
from sdk.endpoints import Endpoints
from sdk.errors import JobNotFound, PlatformError, Unavailable


class Echo(msgspec.Struct):
    text: str


@pytest.fixture
async def served(nc: NatsClient) -> AsyncIterator[tuple[str, Endpoints]]:
    """Endpoints under a prefix of the test's own: `slow` (sleeps the seconds it is sent), `echo`,
    `missing` (a typed error), `broken` (an unexpected exception) and `raw` (bytes as they are)."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"

    async def slow(msg: Msg) -> Echo:
        await asyncio.sleep(float(msg.data))
        return Echo(text="slept")

    async def missing(msg: Msg) -> Echo:
        raise JobNotFound("job j-1 not found", {"id": "j-1"})

    async def broken(msg: Msg) -> Echo:
        raise ValueError("a bug")

    async def raw(msg: Msg) -> bytes:
        return b'{"kind":"error","code":"looks_like_one","message":"but is data"}'

    async def echo(msg: Msg) -> Echo:
        return msgspec.json.decode(msg.data, type=Echo)

    endpoints = Endpoints(nc, queue=f"{prefix}-q", name="test-service")
    handlers = {"slow": slow, "missing": missing, "broken": broken, "raw": raw, "echo": echo}
    await endpoints.serve({f"{prefix}.{name}": handler for name, handler in handlers.items()})
    yield prefix, endpoints
    await endpoints.stop()


async def test_a_slow_request_does_not_hold_up_the_others(nc: NatsClient, served: tuple[str, Endpoints]) -> None:
    prefix, _ = served
    started = time.monotonic()
    replies = await asyncio.gather(*(request(nc, f"{prefix}.slow", b"0.3", Echo) for _ in range(10)))
    assert [reply.text for reply in replies] == ["slept"] * 10
    assert time.monotonic() - started < 1.5, "ten requests of 0.3 s each must run side by side"
    assert await request(nc, f"{prefix}.echo", Echo(text="hi"), Echo) == Echo(text="hi")


async def test_errors_are_typed_replies_marked_in_headers(
    nc: NatsClient, served: tuple[str, Endpoints], caplog: pytest.LogCaptureFixture
) -> None:
    prefix, _ = served
    with pytest.raises(JobNotFound, match="job j-1 not found") as missing:
        await request(nc, f"{prefix}.missing", b"{}", Echo)
    assert missing.value.details == {"id": "j-1"}
    msg = await nc.request(f"{prefix}.missing", b"{}", timeout=5)
    assert (msg.headers or {}).get(subjects.ERROR_HEADER) == "job_not_found"
    assert (msg.headers or {}).get(subjects.ERROR_CODE_HEADER) == "404"

    with caplog.at_level(logging.ERROR, logger="sdk.endpoints"), pytest.raises(PlatformError) as broken:
        await request(nc, f"{prefix}.broken", b"{}", Echo)
    assert (broken.value.code, broken.value.message) == ("internal", "test-service failed: ValueError")
    assert "ValueError: a bug" in caplog.text


async def test_a_reply_is_data_whatever_it_looks_like(nc: NatsClient, served: tuple[str, Endpoints]) -> None:
    prefix, _ = served
    data = await request(nc, f"{prefix}.raw", b"{}", bytes)
    assert data.startswith(b'{"kind":"error"'), "only the headers make a reply an error"


async def test_stop_answers_the_requests_in_flight(nc: NatsClient, served: tuple[str, Endpoints]) -> None:
    prefix, endpoints = served
    pending = asyncio.create_task(request(nc, f"{prefix}.slow", b"30", Echo, timeout_s=10))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await endpoints.stop()
    with pytest.raises(Unavailable, match="test-service is stopping"):
        await pending
    assert time.monotonic() - started < 2
    with pytest.raises(Unavailable, match="nobody answers"):
        await request(nc, f"{prefix}.echo", Echo(text="late"), Echo)
