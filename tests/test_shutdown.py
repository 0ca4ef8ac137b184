"""Stopping the gateway: pending long polls and streams are answered at once, and the process exits in
seconds instead of waiting for them to time out."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from sdk.client import Client
from sdk.errors import Unavailable
from sdk.http import HttpClient
from tests.conftest import running_stack
from tests.test_e2e import operator_headers

pytestmark = pytest.mark.slow


async def test_sigterm_answers_pending_waits_and_streams_with_503_and_exits_at_once(tmp_path: Path) -> None:
    # No worker: a job stays queued, its waits can only end early.
    async with running_stack(tmp_path, []) as stack:
        async with HttpClient(stack.http_url, api_key=stack.operator_key) as http:
            job = await http.submit("echo", params={"parked": True})
            client = await Client.connect(stack.nats_url, api_key=stack.operator_key)
            try:
                async with httpx.AsyncClient(base_url=stack.http_url, headers=await operator_headers(stack)) as raw:
                    http_wait = asyncio.create_task(
                        raw.get(f"/api/v1/jobs/{job.id}/wait", params={"timeout_s": 120}, timeout=120)
                    )
                    nats_wait = asyncio.create_task(client.wait(job.id, timeout_s=120))

                    async def read_stream() -> list[str]:
                        return [piece async for piece in http.stream(job.id, timeout_s=120)]

                    stream = asyncio.create_task(read_stream())
                    await asyncio.sleep(2)  # all three are parked inside the gateway by now
                    assert not any(task.done() for task in (http_wait, nats_wait, stream))

                    gateway = stack.children["gateway"].process
                    assert gateway is not None
                    started = time.monotonic()
                    gateway.send_signal(signal.SIGTERM)

                    response = await asyncio.wait_for(http_wait, 5)
                    assert response.status_code == 503
                    assert response.headers["Retry-After"] == "1"
                    assert response.json()["code"] == "unavailable"
                    with pytest.raises(Unavailable) as nats_error:
                        await asyncio.wait_for(nats_wait, 5)
                    assert nats_error.value.details == {"retry_after_s": 1}
                    with pytest.raises(Unavailable):
                        await asyncio.wait_for(stream, 5)

                    await asyncio.to_thread(gateway.wait, 10)
                    assert time.monotonic() - started < 5, "the gateway took too long to exit"
                    assert gateway.returncode == 0
            finally:
                await client.close()
