"""The broker's own crash: nats-server is SIGKILLed under load and its supervisor starts it again on the
same store. What lived in its memory (the DISPATCH stream, the workers' consumers on it) is gone; every
service notices the restarted server and makes it again, and every acknowledged job completes once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sdk import subjects
from sdk.connection import connect
from sdk.errors import PlatformError
from sdk.events import JobCompleted, job_event_decoder
from sdk.http import HttpClient
from sdk.local import LocalStack
from sdk.log import read_subject
from sdk.process import Child
from tests.conftest import running_stack, wait_until

pytestmark = pytest.mark.slow

#: How often the test plays `gpuctl up`'s supervision loop.
SUPERVISE_EVERY_S = 0.5


@pytest.fixture
async def crash_stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    async with running_stack(tmp_path, ["b1", "b2"]) as stack:
        yield stack


async def supervise(stack: LocalStack) -> None:
    """What `gpuctl up` does between screen refreshes: start again whatever died. In this (the main)
    thread, as gpuctl does: a child dies with the thread that spawned it."""
    while True:
        stack.restart_crashed()
        await asyncio.sleep(SUPERVISE_EVERY_S)


async def submit_until(http: HttpClient, stop: asyncio.Event, acknowledged: list[str]) -> None:
    """Echo jobs one after another; only those the gateway acknowledged (an id came back) count."""
    n = 0
    while not stop.is_set():
        n += 1
        try:
            acknowledged.append((await http.submit("echo", params={"n": n})).id)
        except PlatformError:
            await asyncio.sleep(0.1)  # 503 while the broker is down: not acknowledged, nothing promised


async def completions(stack: LocalStack, job_id: str) -> int:
    nc = await connect(stack.nats_url, name="test-inspect")
    try:
        raw = await read_subject(nc.jetstream(), subjects.JOBS_STREAM, subjects.job_subject(job_id))
    finally:
        await nc.close()
    return sum(isinstance(job_event_decoder.decode(data), JobCompleted) for data, _ in raw)


async def test_every_acknowledged_job_completes_once_after_the_broker_is_killed(crash_stack: LocalStack) -> None:
    stack = crash_stack
    broker = stack.children["nats-server"]
    supervisor = asyncio.create_task(supervise(stack))
    stop = asyncio.Event()
    acknowledged: list[str] = []
    try:
        async with HttpClient(stack.http_url, api_key=stack.operator_key) as http:
            load = asyncio.create_task(submit_until(http, stop, acknowledged))
            await wait_until(lambda: _at_least(acknowledged, 20), 30, "jobs before the crash")
            killed_pid = broker.process.pid if broker.process else None
            broker.kill()
            before_crash = len(acknowledged)

            await wait_until(lambda: _restarted(broker, killed_pid), 15, "the supervisor to restart the broker")
            # Load goes on after the restart: jobs submitted to the new server must run too.
            await wait_until(lambda: _at_least(acknowledged, before_crash + 20), 60, "jobs after the restart")
            stop.set()
            await load

            results = await asyncio.gather(*(http.wait(job_id, timeout_s=90) for job_id in acknowledged))
            assert [job.status for job in results] == ["completed"] * len(acknowledged)
            assert [await completions(stack, job_id) for job_id in acknowledged] == [1] * len(acknowledged)
        assert broker.restarts == 1
        # Retries back off: the dispatch path logs a line per interval, not per try.
        scheduler_log = (stack.logs / "scheduler.log").read_text()
        assert scheduler_log.count(" not sent") < 50
    finally:
        stop.set()
        supervisor.cancel()
        await asyncio.gather(supervisor, return_exceptions=True)


async def _at_least(items: list[str], count: int) -> bool:
    return len(items) >= count


async def _restarted(broker: Child, killed_pid: int | None) -> bool:
    return broker.running and broker.process is not None and broker.process.pid != killed_pid
