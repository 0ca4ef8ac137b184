"""The read models: what `proj.>` answers after a realistic history, and that a replay rebuilds them exactly."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from projections.replay import rebuild
from projections.service import Projections
from projections.store import Store, dump
from sdk import subjects
from sdk.api import GetJob, GetWorker, JobPage, JobView, ListJobs, ListWorkers, WorkerPage, WorkerView
from sdk.broker import EmbeddedNats
from sdk.connection import request
from sdk.errors import BadRequest, JobNotFound, Unavailable, WorkerNotFound
from sdk.events import (
    ErrorInfo,
    Event,
    GpuInfo,
    Heartbeat,
    JobAssigned,
    JobCancelled,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobRequeued,
    JobStarted,
    JobSubmitted,
    WorkerLost,
    WorkerModelLoaded,
    WorkerRegistered,
    encoder,
)
from sdk.jobs import JobStatus
from sdk.log import append
from tests.conftest import platform_nc

EU, US = "w-eu-1", "w-us-1"
GPU = GpuInfo(index=0, name="RTX 4090", memory_total_bytes=24 * 2**30)


class Story(NamedTuple):
    #: The last sequence of each stream after the story.
    last: dict[str, int]
    #: JOBS sequence right after job-a started (a past state for `until_seq`).
    a_started_seq: int


@pytest.fixture
async def client(fresh_nats: EmbeddedNats) -> AsyncIterator[NatsClient]:
    async with platform_nc(fresh_nats, "test-projections") as nc:
        yield nc


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "read-models.db"


@pytest.fixture
async def projections(client: NatsClient, db_path: Path) -> AsyncIterator[Projections]:
    service = Projections(client, db_path, min_seq_wait_s=0.5)
    await service.start()
    yield service
    await service.stop()


async def emit(js: JetStreamContext, event: Event) -> int:
    if isinstance(event, JobEvent):
        subject = subjects.job_subject(event.job_id)
    else:
        subject = subjects.worker_subject(event.worker_id)  # type: ignore[attr-defined]
    return (await append(js, subject, event)).seq


async def tell_story(js: JetStreamContext) -> Story:
    """Two workers, six jobs: completed, requeued after a lost worker (plus a late stale report),
    failed, cancelled, queued and assigned; and heartbeats from a registered and an unknown worker."""
    await emit(js, WorkerRegistered(worker_id=EU, name="alpha", region="eu", capabilities=("echo", "llm"), gpus=(GPU,)))
    await emit(js, WorkerRegistered(worker_id=US, name="beta", region="us"))
    await emit(js, WorkerModelLoaded(worker_id=EU, model="tiny-llm"))

    await emit(js, JobSubmitted(job_id="job-a", job_type="echo", params={"text": "hi"}, owner="key-alice"))
    await emit(js, JobAssigned(job_id="job-a", worker_id=EU, region="eu", attempt=1))
    a_started_seq = await emit(js, JobStarted(job_id="job-a", worker_id=EU, attempt=1))
    await emit(js, JobCompleted(job_id="job-a", worker_id=EU, attempt=1, result={"text": "hi"}))

    await emit(js, JobSubmitted(job_id="job-b", job_type="llm", model="tiny-llm", params={"prompt": "2+2"}))
    await emit(js, JobAssigned(job_id="job-b", worker_id=US, region="us", attempt=1))
    await emit(js, JobStarted(job_id="job-b", worker_id=US, attempt=1))
    await emit(js, WorkerLost(worker_id=US, reason="no heartbeat for 90s"))
    await emit(js, JobRequeued(job_id="job-b", attempt=2, reason="worker lost"))
    await emit(js, JobAssigned(job_id="job-b", worker_id=EU, region="eu", attempt=2))
    await emit(js, JobStarted(job_id="job-b", worker_id=EU, attempt=2))
    # The lost worker's late report: `apply` refuses it, the projection must skip it and go on.
    await emit(js, JobCompleted(job_id="job-b", worker_id=US, attempt=1, result="stale"))

    await emit(js, JobSubmitted(job_id="job-c", job_type="echo", owner="key-alice"))
    await emit(js, JobAssigned(job_id="job-c", worker_id=EU, region="eu", attempt=1))
    oom = ErrorInfo(code="oom", message="out of memory")
    await emit(js, JobFailed(job_id="job-c", worker_id=EU, attempt=1, error=oom))

    await emit(js, JobSubmitted(job_id="job-d", job_type="echo"))
    await emit(js, JobCancelled(job_id="job-d", reason="changed my mind"))
    await emit(js, JobSubmitted(job_id="job-e", job_type="image", model="tiny-sd"))
    await emit(js, JobSubmitted(job_id="job-f", job_type="echo"))
    last_job = await emit(js, JobAssigned(job_id="job-f", worker_id=EU, region="eu", attempt=1))

    beat = Heartbeat(worker_id=EU, region="eu", max_concurrency=4, loaded_models=("tiny-llm", "tiny-sd"), gpus=(GPU,))
    await js.publish(subjects.heartbeat_subject("eu", EU), encoder.encode(beat))
    ghost = Heartbeat(worker_id="w-ghost", region="eu")
    last_beat = (await js.publish(subjects.heartbeat_subject("eu", "w-ghost"), encoder.encode(ghost))).seq
    last = {subjects.JOBS_STREAM: last_job, subjects.WORKERS_STREAM: 4, subjects.HEARTBEATS_STREAM: last_beat}
    return Story(last=last, a_started_seq=a_started_seq)


async def caught_up(projections: Projections, last: dict[str, int]) -> None:
    for stream, seq in last.items():
        await projections.wait_for(stream, seq, timeout_s=10)


async def get_job(nc: NatsClient, job_id: str, **options: Any) -> JobView:
    return await request(nc, subjects.PROJ_JOBS_GET, GetJob(id=job_id, **options), JobView)


async def list_jobs(nc: NatsClient, **filters: Any) -> JobPage:
    return await request(nc, subjects.PROJ_JOBS_LIST, ListJobs(**filters), JobPage)


async def test_queries_answer_the_folded_history(
    client: NatsClient, projections: Projections, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="projections")
    story = await tell_story(client.jetstream())
    await caught_up(projections, story.last)

    a = await get_job(client, "job-a")
    assert (a.status, a.attempt, a.worker_id, a.result, a.progress) == ("completed", 1, EU, {"text": "hi"}, 1.0)
    assert a.seq == 4
    assert a.params == {"text": "hi"} and a.finished_at is not None
    b = await get_job(client, "job-b")
    assert (b.status, b.attempt, b.worker_id, b.result, b.seq) == ("running", 2, EU, None, 10)
    c = await get_job(client, "job-c")
    assert (c.status, c.worker_id, c.error) == ("failed", EU, ErrorInfo(code="oom", message="out of memory"))
    statuses = [(await get_job(client, j)).status for j in ("job-d", "job-e", "job-f")]
    assert statuses == ["cancelled", "queued", "assigned"]
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
        "skipped JOBS #11 (JobCompleted): job job-b is at attempt 2 on worker w-eu-1; "
        "report was for attempt 1 on worker w-us-1"
    ]

    eu = await request(client, subjects.PROJ_WORKERS_GET, GetWorker(id=EU), WorkerView)
    assert (eu.name, eu.region, eu.status, eu.capabilities) == ("alpha", "eu", "online", ["echo", "llm"])
    assert eu.capacity == 4
    assert eu.in_flight == ["job-b", "job-f"]
    assert eu.loaded_models == ["tiny-llm", "tiny-sd"]  # the heartbeat is newer than the load event
    assert eu.gpus == [GPU] and eu.last_heartbeat is not None
    us = await request(client, subjects.PROJ_WORKERS_GET, GetWorker(id=US), WorkerView)
    assert (us.status, us.in_flight, us.capacity, us.last_heartbeat) == ("lost", [], 1, None)
    page = await request(client, subjects.PROJ_WORKERS_LIST, ListWorkers(), WorkerPage)
    assert [(w.id, w.status) for w in page.items] == [(EU, "online"), (US, "lost")]
    lost = await request(client, subjects.PROJ_WORKERS_LIST, ListWorkers(status="lost"), WorkerPage)
    assert [w.id for w in lost.items] == [US]


async def test_unknown_ids_and_bad_requests_get_error_replies(client: NatsClient, projections: Projections) -> None:
    await caught_up(projections, (await tell_story(client.jetstream())).last)

    with pytest.raises(JobNotFound, match="job job-zzz not found"):
        await get_job(client, "job-zzz")
    # A worker only heard of through heartbeats is not a registered worker.
    with pytest.raises(WorkerNotFound, match="worker w-ghost not found"):
        await request(client, subjects.PROJ_WORKERS_GET, GetWorker(id="w-ghost"), WorkerView)
    with pytest.raises(BadRequest, match="cursor 'abc' is not one this endpoint returned"):
        await list_jobs(client, cursor="abc")
    with pytest.raises(BadRequest, match="status 'done' is not one of queued, assigned"):
        await list_jobs(client, status="done")
    with pytest.raises(BadRequest, match="status 'gone' is not one of online, draining, lost, deregistered"):
        await request(client, subjects.PROJ_WORKERS_LIST, ListWorkers(status="gone"), WorkerPage)
    with pytest.raises(BadRequest):
        await request(client, subjects.PROJ_JOBS_GET, b"not json", JobView)
    with pytest.raises(BadRequest, match="unknown field `color`"):
        await request(client, subjects.PROJ_JOBS_LIST, b'{"color": "red"}', JobPage)


async def test_list_filters_and_cursor_pages_return_every_job_once(
    client: NatsClient, projections: Projections
) -> None:
    js = client.jetstream()
    story = await tell_story(js)
    for n in range(17):
        last = await emit(js, JobSubmitted(job_id=f"bulk-{n:02d}", job_type="echo"))
    await caught_up(projections, {**story.last, subjects.JOBS_STREAM: last})

    seen: list[JobView] = []
    cursor = None
    while True:
        page = await list_jobs(client, limit=5, cursor=cursor)
        seen += page.items
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    expected = [f"bulk-{n:02d}" for n in reversed(range(17))] + ["job-f", "job-e", "job-d", "job-c", "job-b", "job-a"]
    assert [job.id for job in seen] == expected
    assert len(seen) == 23 and len({job.id for job in seen}) == 23

    assert [j.id for j in (await list_jobs(client, status="queued")).items[-2:]] == ["bulk-00", "job-e"]
    assert len((await list_jobs(client, status="queued", limit=500)).items) == 18
    assert [j.id for j in (await list_jobs(client, worker_id=EU)).items] == ["job-f", "job-c", "job-b", "job-a"]
    assert [j.id for j in (await list_jobs(client, type="llm")).items] == ["job-b"]
    assert [j.id for j in (await list_jobs(client, status="failed", worker_id=EU)).items] == ["job-c"]
    # The gateway adds the caller's principal to the request when auth is on.
    mine = await request(client, subjects.PROJ_JOBS_LIST, b'{"owner": "key-alice"}', JobPage)
    assert [j.id for j in mine.items] == ["job-c", "job-a"]
    last_page = await list_jobs(client, status="running", limit=1)
    assert ([j.id for j in last_page.items], last_page.next_cursor) == (["job-b"], None)


@contextmanager
def write_locked(db_path: Path) -> Iterator[None]:
    """Another process holds the read model's database: the projection cannot commit (a real lag)."""
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        yield
        blocker.execute("COMMIT")
    finally:
        blocker.close()


async def test_min_seq_waits_until_the_write_is_applied(client: NatsClient, db_path: Path) -> None:
    js = client.jetstream()
    projections = Projections(client, db_path, min_seq_wait_s=30)
    await projections.start()
    try:
        with write_locked(db_path):
            await emit(js, JobSubmitted(job_id="job-x", job_type="echo"))
            seq = await emit(js, JobCancelled(job_id="job-x"))
            read = asyncio.create_task(get_job(client, "job-x", min_seq=seq))
            await asyncio.sleep(0.3)
            assert not read.done(), "the read answered before the projection applied its min_seq"
        assert (await read).status == "cancelled"
    finally:
        await projections.stop()


async def test_min_seq_of_a_lagging_projection_is_unavailable(
    client: NatsClient, projections: Projections, db_path: Path
) -> None:
    js = client.jetstream()
    first = await emit(js, JobSubmitted(job_id="job-x", job_type="echo"))
    await projections.wait_for(subjects.JOBS_STREAM, first, timeout_s=10)
    with write_locked(db_path):
        seq = await emit(js, JobCancelled(job_id="job-x"))
        with pytest.raises(Unavailable, match=rf"applied JOBS up to #{first}, not #{seq}, after 0.5s"):
            await get_job(client, "job-x", min_seq=seq)
    with pytest.raises(Unavailable):
        await projections.wait_for(subjects.WORKERS_STREAM, 1, timeout_s=0.1)


async def test_min_seq_beyond_the_end_of_the_log_is_refused_at_once(
    client: NatsClient, projections: Projections
) -> None:
    seq = await emit(client.jetstream(), JobSubmitted(job_id="job-x", job_type="echo"))
    started = asyncio.get_running_loop().time()
    beyond = rf"min_seq 10254099 is beyond the end of JOBS \(its last sequence is {seq}\)"
    with pytest.raises(BadRequest, match=beyond) as refused:
        await get_job(client, "job-x", min_seq=10254099)
    assert refused.value.details == {"min_seq": 10254099, "last_seq": seq}
    with pytest.raises(BadRequest, match=beyond):
        await list_jobs(client, min_seq=10254099)
    assert asyncio.get_running_loop().time() - started < 0.5  # no wait for what can never come
    assert (await get_job(client, "job-x", min_seq=seq)).status == "queued"


async def test_an_undecodable_event_is_skipped_and_the_fold_goes_on(
    client: NatsClient, projections: Projections
) -> None:
    js = client.jetstream()
    await js.publish(subjects.job_subject("junk"), b"not an event")
    seq = await emit(js, JobSubmitted(job_id="job-y", job_type="echo"))
    assert (await get_job(client, "job-y", min_seq=seq)).status == "queued"
    assert projections.applied_seq(subjects.JOBS_STREAM) == 2


async def test_rebuild_from_the_streams_gives_the_same_tables(
    fresh_nats: EmbeddedNats, client: NatsClient, db_path: Path, tmp_path: Path
) -> None:
    # Start after the story, so the three streams' consumers interleave as they like.
    story = await tell_story(client.jetstream())
    service = Projections(client, db_path)
    await service.start()
    await caught_up(service, story.last)
    await service.stop()
    live = await dump(db_path)
    assert len(live["jobs"]) == 6 and len(live["workers"]) == 3  # the ghost's heartbeat row included

    for leftover in tmp_path.glob(f"{db_path.name}*"):
        leftover.unlink()
    positions = await rebuild(fresh_nats.url, db_path)
    assert positions == story.last
    assert await dump(db_path) == live

    # A past state: JOBS only up to job-a's start. Read the file itself: a live service would catch up.
    past_path = tmp_path / "past.db"
    positions = await rebuild(fresh_nats.url, past_path, until_seq=story.a_started_seq)
    assert positions == {**story.last, subjects.JOBS_STREAM: story.a_started_seq}
    past = await Store.open(past_path)
    try:
        a = await past.get_job("job-a")
        assert a is not None
        assert (a.status, a.worker_id, a.result, a.finished_at_ms) == (JobStatus.RUNNING, EU, None, None)
        assert await past.get_job("job-b") is None
    finally:
        await past.close()


async def test_restart_resumes_from_its_position_without_applying_twice(
    fresh_nats: EmbeddedNats, client: NatsClient, db_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    js = client.jetstream()
    first = Projections(client, db_path)
    await first.start()
    story = await tell_story(js)
    await caught_up(first, story.last)
    await first.stop()

    caplog.clear()
    caplog.set_level(logging.WARNING, logger="projections")
    second = Projections(client, db_path)
    await second.start()
    try:
        assert {s: second.applied_seq(s) for s in story.last} == story.last
        done = await emit(js, JobCompleted(job_id="job-b", worker_id=EU, attempt=2, result="4"))
        await second.wait_for(subjects.JOBS_STREAM, done, timeout_s=10)
        b = await get_job(client, "job-b")
        assert (b.status, b.attempt, b.result) == ("completed", 2, "4")
        eu = await request(client, subjects.PROJ_WORKERS_GET, GetWorker(id=EU), WorkerView)
        assert eu.in_flight == ["job-f"]
    finally:
        await second.stop()
    # Nothing from before the restart came through again (a re-applied `JobSubmitted` would be refused).
    assert [r.getMessage() for r in caplog.records] == []
    live = await dump(db_path)
    await rebuild(fresh_nats.url, tmp_path / "replayed.db")
    assert await dump(tmp_path / "replayed.db") == live
