"""Regions, placement explanations and backpressure end to end: a platform with workers in three regions,
every component a real process."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from sdk import subjects
from sdk.client import Client
from sdk.connection import connect
from sdk.errors import BadRequest, Forbidden, QueueFull
from sdk.http import HttpClient
from sdk.local import LocalStack
from sdk.platform_config import QueueLimits
from tests.conftest import running_stack

pytestmark = pytest.mark.slow

REGIONS = {"eu-1": "eu-west", "us-1": "us-east", "ap-1": "ap-south"}
LATENCY_MS = {"eu-west": {"us-east": 80, "ap-south": 130}, "us-east": {"ap-south": 210}}


@pytest.fixture(scope="module")
async def geo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    async with running_stack(tmp_path_factory.mktemp("geo"), list(REGIONS), REGIONS) as local:
        yield local


@pytest.fixture
async def operator(geo: LocalStack) -> AsyncIterator[HttpClient]:
    async with HttpClient(geo.http_url, api_key=geo.operator_key) as http:
        await http.set_regions(LATENCY_MS)
        yield http


async def new_client(operator: HttpClient, geo: LocalStack, **options: Any) -> HttpClient:
    created = await operator.create_api_key(f"geo-{secrets.token_hex(3)}")
    return HttpClient(geo.http_url, api_key=created.api_key, **options)


async def worker_ids(operator: HttpClient) -> dict[str, str]:
    return {w.name: w.id for w in await operator.workers() if w.status == "online"}


async def set_acceptance(operator: HttpClient, worker_id: str, rate: float) -> None:
    await operator.set_worker_config(worker_id, {"load_control": {"acceptance_rate": rate}})


async def test_region_table_is_operator_only_and_refused_whole_when_malformed(
    operator: HttpClient, geo: LocalStack
) -> None:
    before = await operator.regions()
    assert before.latency_ms == LATENCY_MS
    malformed = [
        {"latency_ms": {"eu-west": {"us-east": -5}}},
        {"latency_ms": {"eu-west": {"eu-west": 3}}},
        {"latency_ms": {"a": {"b": 1}, "b": {"a": 2}}},
        {"latency_ms": {"eu west": {"b": 1}}},
        {"latency_ms": [], "extra": 1},
    ]
    token = (await operator.auth.headers())["Authorization"]
    async with httpx.AsyncClient(base_url=geo.http_url, headers={"Authorization": token}) as raw:
        for body in malformed:
            response = await raw.put("/api/v1/config/regions", json=body)
            assert (response.status_code, response.json()["code"]) == (400, "bad_request"), body
    with pytest.raises(BadRequest, match="a region is 0 ms from itself"):
        await operator.set_regions({"eu-west": {"eu-west": 3}})
    assert await operator.regions() == before

    async with await new_client(operator, geo) as client:
        with pytest.raises(Forbidden):
            await client.set_regions({"eu-west": {"us-east": 1}})


async def test_region_policies_place_and_explain(operator: HttpClient, geo: LocalStack) -> None:
    ids = await worker_ids(operator)
    await set_acceptance(operator, ids["eu-1"], 0.0)  # eu-west has a worker, but it takes nothing
    try:
        # nearest: the home region cannot take it, so the nearest other region (us-east, 80 ms) does.
        near = await operator.submit("echo", region="eu-west")
        done = await operator.wait(near.id, timeout_s=30)
        assert (done.status, done.worker_id) == ("completed", ids["us-1"])
        placed = await operator.placement(near.id)
        assert (placed.worker_id, placed.worker_region, placed.distance_ms) == (ids["us-1"], "us-east", 80)
        assert placed.rank is not None and placed.rank.startswith("region us-east (80 ms from eu-west)")

        # max_latency_ms below every other region: it waits, and says why.
        bounded = await operator.submit("echo", region="eu-west", max_latency_ms=50)
        why = await operator.placement(bounded.id)
        assert (why.status, why.able_workers) == ("queued", 0)
        reasons = {r.reason: (r.workers, r.sample) for r in why.reasons}
        assert reasons == {
            "declined (acceptance rate 0.00)": (1, [ids["eu-1"]]),
            "region us-east farther than max_latency_ms 50": (1, [ids["us-1"]]),
            "region ap-south farther than max_latency_ms 50": (1, [ids["ap-1"]]),
        }

        # strict: waits for its own region even though others are free.
        strict = await operator.submit("echo", region="eu-west", region_policy="strict")
        why = await operator.placement(strict.id)
        assert why.region_policy == "strict"
        assert {r.reason for r in why.reasons} == {
            "declined (acceptance rate 0.00)",
            "region us-east is not eu-west (strict)",
            "region ap-south is not eu-west (strict)",
        }
        assert (await operator.get(strict.id)).status == "queued"
    finally:
        await set_acceptance(operator, ids["eu-1"], 1.0)

    # The change applies live: both waiting jobs now run at home, 0 ms away.
    for job_id in (bounded.id, strict.id):
        done = await operator.wait(job_id, timeout_s=30)
        assert (done.status, done.worker_id) == ("completed", ids["eu-1"])
        assert (await operator.placement(job_id)).distance_ms == 0

    # any: distance ignored; the job runs wherever the ranking says.
    anywhere = await operator.submit("echo", region="eu-west", region_policy="any")
    assert (await operator.wait(anywhere.id, timeout_s=30)).status == "completed"


async def test_a_new_latency_table_applies_to_the_next_placement(operator: HttpClient, geo: LocalStack) -> None:
    ids = await worker_ids(operator)
    await set_acceptance(operator, ids["eu-1"], 0.0)
    try:
        # Within 20 ms of eu-west there is no other region yet: the job waits until the table changes.
        job = await operator.submit("echo", region="eu-west", max_latency_ms=20)
        await operator.set_regions({"eu-west": {"ap-south": 10, "us-east": 80}, "us-east": {"ap-south": 210}})
        done = await operator.wait(job.id, timeout_s=30)
        assert (done.status, done.worker_id) == ("completed", ids["ap-1"])
        assert (await operator.placement(job.id)).distance_ms == 10
    finally:
        await set_acceptance(operator, ids["eu-1"], 1.0)
        await operator.set_regions(LATENCY_MS)


async def test_placement_over_nats_and_only_for_the_owner(operator: HttpClient, geo: LocalStack) -> None:
    async with await new_client(operator, geo, region="sa-east") as alice, await new_client(operator, geo) as bob:
        waiting = await alice.submit("echo", region_policy="strict")  # the client's region: no worker there
        why = await alice.placement(waiting.id)
        assert (why.region, why.status, why.able_workers) == ("sa-east", "queued", 0)
        assert sorted(r.reason for r in why.reasons) == [
            f"region {region} is not sa-east (strict)" for region in ("ap-south", "eu-west", "us-east")
        ]
        assert all("a worker of region sa-east" in r.change for r in why.reasons)
        with pytest.raises(Exception, match="not found"):
            await bob.placement(waiting.id)
        async with await Client.connect(geo.nats_url, api_key=geo.operator_key) as nats_client:
            assert (await nats_client.placement(waiting.id)).reasons == why.reasons
        await alice.cancel(waiting.id)


async def test_backpressure_refuses_past_a_limit_with_retry_after_and_appends_nothing(
    operator: HttpClient, geo: LocalStack
) -> None:
    # Jobs strict to a region without workers stay queued, so the counts hold still.
    submitted: list[tuple[HttpClient, str]] = []

    async def submit(client: HttpClient) -> None:
        submitted.append((client, (await client.submit("echo", region_policy="strict")).id))

    nc = await connect(geo.nats_url, name="test-backpressure")
    async with await new_client(operator, geo, region="sa-east") as alice, await new_client(
        operator, geo, region="sa-east"
    ) as bob:
        await operator.set_limits(QueueLimits(max_queued_per_client=2, max_queued=3, retry_after_s=7))
        try:
            await submit(alice)
            await submit(alice)
            last_seq = (await nc.jetstream().stream_info(subjects.JOBS_STREAM)).state.last_seq
            with pytest.raises(QueueFull) as refused:
                await submit(alice)
            assert refused.value.retry_after_s == 7
            assert refused.value.details == {
                "limit": "max_queued_per_client", "value": 2, "queued": 2, "retry_after_s": 7,
            }
            assert (await nc.jetstream().stream_info(subjects.JOBS_STREAM)).state.last_seq == last_seq

            await submit(bob)  # another client still fits ...
            token = (await bob.auth.headers())["Authorization"]
            async with httpx.AsyncClient(base_url=geo.http_url) as raw:  # ... until the platform is full
                response = await raw.post(
                    "/api/v1/jobs", json={"type": "echo", "region": "sa-east"}, headers={"Authorization": token}
                )
            assert response.status_code == 429
            assert response.headers["Retry-After"] == "7"
            assert response.json()["details"]["limit"] == "max_queued"

            await alice.cancel(submitted.pop(0)[1])  # a slot frees: accepted again, at once
            await submit(alice)
        finally:
            await operator.set_limits(QueueLimits())
            for client, job_id in submitted:
                await client.cancel(job_id)
            await nc.close()
