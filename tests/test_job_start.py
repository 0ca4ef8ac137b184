"""A worker starts the engine while its `started` report is on its way, yet the log still reads as the
job ran: started before any progress, the ending last, each once."""

from __future__ import annotations

import asyncio

import pytest

from sdk.client import Client
from sdk.events import event_type


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
