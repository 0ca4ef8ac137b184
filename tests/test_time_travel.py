"""Time travel: a job, the job list and the fleet as they were at a JOBS sequence or a moment, folded from
the log, over HTTP and NATS alike; bad moments are 400s; a client still sees only its own jobs;
`gpuctl replay --until-time` rebuilds a past state into a database of the user's choice."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import httpx
import pytest

from sdk.client import Client
from sdk.errors import BadRequest, JobNotFound
from sdk.events import event_type
from sdk.http import HttpClient
from sdk.jobs import JobStatus
from sdk.local import LocalStack
from tests.conftest import wait_until
from tests.test_gpuctl import gpuctl

pytestmark = pytest.mark.slow


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def test_a_job_and_the_list_as_they_were_at_each_sequence(client: Client, http: HttpClient) -> None:
    before = now()
    job = await http.wait((await http.submit("echo", params={"travel": 1})).id, timeout_s=30)
    history = {event_type(record.event): record.seq for record in await http.events(job.id)}

    for sdk_client in (client, http):  # NATS and HTTP
        queued = await sdk_client.get(job.id, at_seq=history["job.submitted"])
        assert (queued.status, queued.worker_id, queued.seq) == ("queued", None, history["job.submitted"])
        assigned = await sdk_client.get(job.id, at_seq=history["job.started"] - 1)
        assert (assigned.status, assigned.worker_id) == ("assigned", job.worker_id)
        assert await sdk_client.get(job.id, at_seq=history["job.completed"]) == job
        assert await sdk_client.get(job.id, at_time=now()) == job
        with pytest.raises(JobNotFound):
            await sdk_client.get(job.id, at_time=before)

        page = await sdk_client.list(at_seq=history["job.submitted"], limit=500)
        assert [j.status for j in page.items if j.id == job.id] == ["queued"]
        assert page.items[0].id == job.id  # newest first, and nothing newer existed yet
        assert job.id not in {j.id for j in (await sdk_client.list(at_time=before, limit=500)).items}
        finished = await sdk_client.list(at_seq=history["job.completed"], status="completed", limit=500)
        assert job.id in {j.id for j in finished.items}


async def test_a_moment_while_the_job_ran_shows_it_running_and_replay_rebuilds_that_moment(
    stack: LocalStack, http: HttpClient, tmp_path: Path
) -> None:
    submitted = await http.submit("echo", params={"sleep_s": 1.5})

    async def running() -> bool:
        return (await http.get(submitted.id, min_seq=submitted.seq)).status == JobStatus.RUNNING.value

    await wait_until(running, 20, "the job to run")
    moment = now()
    done = await http.wait(submitted.id, timeout_s=30)
    past = await http.get(submitted.id, at_time=moment)
    assert (past.status, past.worker_id, past.finished_at) == ("running", done.worker_id, None)
    fleet = {w.id: w for w in await http.workers(at_time=moment)}
    assert fleet[str(done.worker_id)].in_flight == [submitted.id]
    assert submitted.id not in {job for w in await http.workers(at_time=now()) for job in w.in_flight}
    assert await http.workers(at_time="2000-01-01T00:00:00Z") == []

    db = tmp_path / "then.db"
    result = gpuctl("replay", "--db", str(db), "--until-time", moment.isoformat(), env={"NATS_URL": stack.nats_url})
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(db) as rows:
        assert rows.execute("SELECT status FROM jobs WHERE id = ?", (submitted.id,)).fetchall() == [("running",)]
    refused = gpuctl("replay", "--db", str(db), "--until-time", "noon", env={"NATS_URL": stack.nats_url})
    assert refused.returncode == 2 and "'noon'" in refused.stderr


async def test_bad_moments_are_400s_naming_what_is_wrong(stack: LocalStack, client: Client, http: HttpClient) -> None:
    job = await http.wait((await http.submit("echo", params={})).id, timeout_s=30)
    with pytest.raises(BadRequest) as beyond:
        await client.get(job.id, at_seq=10**12)
    assert beyond.value.details["last_seq"] >= job.seq and "last sequence is" in beyond.value.message
    with pytest.raises(BadRequest, match="not both"):
        await client.list(at_seq=1, at_time=now())
    with pytest.raises(BadRequest, match="'yesterday'"):
        await client.get(job.id, at_time="yesterday")
    with pytest.raises(BadRequest, match="no time zone"):
        await http.get(job.id, at_time=dt.datetime(2026, 1, 1))

    headers = await http.auth.headers()  # the operator's access token, as the SDK sends it
    async with httpx.AsyncClient(base_url=stack.http_url, headers=headers) as raw:
        for path, params in [
            (f"/api/v1/jobs/{job.id}", {"at_seq": 10**12}),
            (f"/api/v1/jobs/{job.id}", {"at_seq": 1, "at_time": "2026-01-01T00:00:00Z"}),
            ("/api/v1/jobs", {"at_time": "2026-13-45T99:00:00Z"}),
            ("/api/v1/workers", {"at_time": "last tuesday"}),
        ]:
            response = await raw.get(path, params=params)
            assert response.status_code == 400, (path, params, response.text)


async def test_a_client_travels_through_its_own_jobs_only(stack: LocalStack, http: HttpClient) -> None:
    keys = [(await http.create_api_key(f"traveller-{n}")).api_key for n in range(2)]
    async with HttpClient(stack.http_url, api_key=keys[0]) as alice, HttpClient(stack.http_url, api_key=keys[1]) as bob:
        job = await alice.wait((await alice.submit("echo", params={"mine": True})).id, timeout_s=30)
        assert (await alice.get(job.id, at_seq=job.seq)).status == "completed"
        with pytest.raises(JobNotFound):
            await bob.get(job.id, at_seq=job.seq)
        assert job.id not in {j.id for j in (await bob.list(at_seq=job.seq, limit=500)).items}
        assert job.id in {j.id for j in (await alice.list(at_seq=job.seq, limit=500)).items}
