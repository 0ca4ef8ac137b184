"""The dashboard's live feed (`GET /api/v1/live`): server-sent events of the platform, limited to what
the signed-in principal may see."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from sdk.http import HttpClient
from sdk.local import LocalStack
from tests.conftest import wait_until

pytestmark = pytest.mark.slow


async def access_token(base_url: str, api_key: str) -> str:
    async with httpx.AsyncClient(base_url=base_url) as raw:
        response = await raw.post("/api/v1/auth/token", json={"api_key": api_key})
    response.raise_for_status()
    return response.json()["access_token"]


async def collect(base_url: str, token: str, into: list[tuple[str, dict[str, Any]]], ready: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=None) as raw:
        async with aconnect_sse(raw, "GET", "/api/v1/live", headers={"Authorization": f"Bearer {token}"}) as source:
            async for sse in source.aiter_sse():
                if sse.event == "ready":
                    ready.set()
                elif sse.event:
                    into.append((sse.event, json.loads(sse.data)))


async def test_a_client_sees_its_own_jobs_and_an_operator_sees_everything(stack: LocalStack, http: HttpClient) -> None:
    client_key = (await http.create_api_key(f"live-{secrets.token_hex(3)}", "client")).api_key
    seen: dict[str, list[tuple[str, dict[str, Any]]]] = {"client": [], "operator": []}
    tasks = []
    for who, key in (("client", client_key), ("operator", stack.operator_key)):
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(collect(stack.http_url, await access_token(stack.http_url, key), seen[who], ready)))
        await asyncio.wait_for(ready.wait(), 10)
    try:
        operators_job = await http.submit("echo", params={"who": "operator"})
        async with HttpClient(stack.http_url, api_key=client_key) as as_client:
            clients_job = await as_client.submit("echo", params={"who": "client"})
            assert (await as_client.wait(clients_job.id, timeout_s=30)).status == "completed"
        assert (await http.wait(operators_job.id, timeout_s=30)).status == "completed"

        def job_events(who: str, job_id: str) -> list[str]:
            return [data["event"]["type"] for event, data in seen[who] if event == "job" and data["job_id"] == job_id]

        async def both_completed() -> bool:
            return job_events("client", clients_job.id)[-1:] == job_events("operator", operators_job.id)[-1:] == [
                "job.completed"
            ]

        async def a_heartbeat() -> bool:
            return any(event == "heartbeat" for event, _ in seen["operator"])

        await wait_until(both_completed, 15, "both jobs' completion on the feeds")
        # Only an operator gets the fleet's telemetry (the stack's workers beat every 0.4 s).
        await wait_until(a_heartbeat, 15, "a heartbeat on the operator's feed")
        assert job_events("client", clients_job.id) == ["job.submitted", "job.assigned", "job.started", "job.completed"]
        assert job_events("client", operators_job.id) == []  # another owner's job never shows
        assert {"job.submitted", "job.completed"} <= set(job_events("operator", clients_job.id))
        assert not any(event in ("heartbeat", "worker") for event, _ in seen["client"])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_live_feed_needs_a_token(stack: LocalStack) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url) as raw:
        response = await raw.get("/api/v1/live")
        page = await raw.get("/dashboard")
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    # The page itself is public (it holds no data): it asks for a key.
    assert page.status_code == 200 and 'id="api-key"' in page.text
