"""The gateway's per-job state stays bounded however many jobs it serves (issue 8 §6): its feed caches
live jobs only, at most `cache_size` of them, and a wait leaves nothing behind."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from nats.aio.client import Client as NatsClient

from gateway.auth import Credentials
from gateway.feed import JobFeed
from gateway.service import Gateway
from sdk.api import CancelJob, SubmitJob
from sdk.errors import Timeout
from sdk.events import JobCancelled, JobSubmitted
from sdk.jobs import JobStatus, apply
from tests.conftest import wait_until

BOUND = 20


async def test_feed_holds_at_most_its_bound_and_forgets_finished_jobs(nc: NatsClient) -> None:
    async with await Credentials.open(nc.jetstream(), secrets.token_bytes(32)) as credentials:
        # The real feed, with bounds a test can pass.
        gateway = Gateway(nc, credentials, feed=JobFeed(nc, cache_size=BOUND, finished_size=BOUND))
        await gateway.start()
        try:
            # No scheduler: the jobs stay queued (live) until they are cancelled.
            submitted = [await gateway.submit(SubmitJob(type="echo", params={"n": n})) for n in range(3 * BOUND)]
            ids = [s.id for s in submitted]
            assert len(gateway.feed) <= BOUND
            assert gateway.feed.get(ids[-1]) is not None, "the newest live job is cached"
            assert all(gateway.feed.get(job_id) is None for job_id in ids[:BOUND]), "the oldest left first"

            # Waits that end by timeout and waits that end with the job leave no waiter behind.
            for job_id in ids[:5]:
                with pytest.raises(Timeout):
                    await gateway.wait(job_id, 0.1)
            assert gateway.feed.waiting == 0
            ending = [asyncio.create_task(gateway.wait(job_id, 30)) for job_id in ids]

            async def all_parked() -> bool:
                return gateway.feed.waiting == len(ids)

            await wait_until(all_parked, 10, "every wait to be parked")

            for job_id in ids:
                await gateway.cancel(CancelJob(id=job_id))
            finished = await asyncio.gather(*ending)
            assert {view.status for view in finished} == {"cancelled"}
            assert gateway.feed.waiting == 0

            # Finished jobs leave the cache, also once the feed's copy of the log catches up.
            async def none_cached() -> bool:
                return len(gateway.feed) == 0

            await wait_until(none_cached, 10, "the feed to drop finished jobs")
            for job_id in ids:  # reading a finished job does not bring it back
                await gateway.wait(job_id, 1)
            assert len(gateway.feed) == 0
            # The finished jobs kept for waits are bounded too: the newest are answered from memory.
            assert gateway.feed.finished == BOUND
            assert gateway.feed.recent(ids[-1]) is not None and gateway.feed.recent(ids[0]) is None
        finally:
            await gateway.stop()


async def test_a_stale_read_does_not_bring_a_finished_job_back(nc: NatsClient) -> None:
    """A wait answers from the feed's copy: a read that began before a job ended and came back after it
    must not make the job look live again (the wait would then miss its ending)."""
    feed = JobFeed(nc)
    submitted = apply(None, JobSubmitted(job_id="j-stale", job_type="echo"), 1)
    cancelled = apply(submitted, JobCancelled(job_id="j-stale"), 2)
    feed.remember(cancelled)
    feed.remember(submitted)
    assert feed.get("j-stale") is None
    recent = feed.recent("j-stale")
    assert recent is not None and recent.status is JobStatus.CANCELLED and recent.seq == 2
