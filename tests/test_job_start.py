"""A worker starts the engine before its `started` report is answered, yet the log still reads as the job
ran: started before any progress, the ending last, each once. A job that ends at once (echo) reports its
start with its ending, in one request, and its log still shows the start."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import ConsumerConfig

import worker.jobs
from sdk import subjects
from sdk.client import Client
from sdk.events import event_type
from worker.jobs import _KeepAlive


@pytest.mark.slow
async def test_the_log_reads_started_then_progress_then_the_ending(client: Client) -> None:
    jobs = await asyncio.gather(*(client.submit("echo", params={"sleep_s": 1.2, "n": n}) for n in range(3)))
    done = await asyncio.gather(*(client.wait(job.id, timeout_s=60) for job in jobs))
    assert [view.status for view in done] == ["completed"] * 3
    for job in jobs:
        kinds = [event_type(record.event) for record in await client.events(job.id)]
        assert kinds[:3] == ["job.submitted", "job.assigned", "job.started"], kinds
        assert kinds[-1] == "job.completed", kinds
        between = kinds[3:-1]
        assert between and set(between) == {"job.progress"}, kinds  # a 1.2 s job reports progress


@pytest.mark.slow
async def test_a_job_that_ends_at_once_still_shows_its_start_in_the_log(client: Client) -> None:
    jobs = await asyncio.gather(*(client.submit("echo", params={"n": n}) for n in range(5)))
    done = await asyncio.gather(*(client.wait(job.id, timeout_s=60) for job in jobs))
    assert [view.result for view in done] == [{"n": n} for n in range(5)]
    for job, view in zip(jobs, done):
        records = await client.events(job.id)
        assert [event_type(record.event) for record in records] == [
            "job.submitted", "job.assigned", "job.started", "job.completed"
        ]
        started, completed = records[2], records[3]
        assert started.seq < completed.seq == view.seq
        assert (started.event.worker_id, started.event.attempt) == (view.worker_id, 1)
        assert view.started_at is not None


async def test_a_held_dispatch_is_kept_from_redelivery_until_its_job_lets_go(
    nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that runs past the dispatch's ack wait must not be handed out again meanwhile; once the job
    lets go without an ack (the worker died), JetStream hands it out again."""
    monkeypatch.setattr(worker.jobs, "DISPATCH_ACK_WAIT_S", 1.2)  # extended every 0.4 s
    js = nc.jetstream()
    subject = subjects.dispatch_subject("r", "w-keep")
    await js.publish(subject, b"{}", stream=subjects.DISPATCH_STREAM)
    sub = await js.pull_subscribe(subject, durable="w-keep", stream=subjects.DISPATCH_STREAM,
                                  config=ConsumerConfig(ack_wait=1.2))
    (msg,) = await sub.fetch(1, timeout=5)
    keep_alive = _KeepAlive(msg)
    try:
        with pytest.raises(TimeoutError):
            await sub.fetch(1, timeout=3)  # 2.5 ack waits: still held
    finally:
        keep_alive.cancel()
    (again,) = await sub.fetch(1, timeout=5)
    assert again.metadata.num_delivered == 2
