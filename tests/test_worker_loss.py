"""A worker's loss told by its connection: a SIGKILLed worker's connection closes at once, nats-server says
so in a system advisory, the gateway forwards it to the schedulers (`gateway.bus.advisories`), and the
leader declares the worker lost one heartbeat interval later (`scheduler.connections`), not after three
missed heartbeats. A worker whose connection only dropped, and opened again at once, loses nothing.

Heartbeats every 3 s here, so that the two ways are seconds apart even on a loaded machine: by its
connection the worker is lost about one interval after the kill; by its silence never before two
intervals after it (three intervals after its last heartbeat, which came at most one before the kill)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from sdk import subjects
from sdk.connection import connect
from sdk.events import JobRequeued, WorkerLost, heartbeat_decoder, worker_event_decoder
from sdk.history import read_log
from sdk.http import HttpClient
from sdk.local import LocalStack
from tests.conftest import running_stack, wait_until

pytestmark = pytest.mark.slow

INTERVAL_S = 3.0


async def _beating_every(nc: NatsClient, http: HttpClient, interval_s: float) -> None:
    await http.set_config_defaults({"heartbeat_interval_s": interval_s})
    workers = await http.workers()
    js = nc.jetstream()

    async def beating() -> bool:
        for w in workers:
            last = await js.get_msg(subjects.HEARTBEATS_STREAM, subject=subjects.heartbeat_subject(w.region, w.id), direct=True)
            if heartbeat_decoder.decode(last.data or b"").interval_s != interval_s:
                return False
        return True

    await wait_until(beating, 30, f"heartbeats every {interval_s:g}s")


async def _running_job(http: HttpClient, sleep_s: float) -> tuple[str, str]:
    """A job that runs for `sleep_s`, once it runs: its id and its worker's."""
    accepted = await http.submit("echo", params={"sleep_s": sleep_s})

    async def running() -> bool:
        return (await http.get(accepted.id, min_seq=accepted.seq)).status == "running"

    await wait_until(running, 30, "the job to run")
    job = await http.get(accepted.id, min_seq=accepted.seq)
    assert job.worker_id is not None
    return accepted.id, job.worker_id


async def _losses(nc: NatsClient, worker_id: str) -> list[tuple[float, WorkerLost]]:
    """The worker's `WorkerLost` events, with when the broker stored each (epoch seconds)."""
    found = []
    async for record in read_log(nc.jetstream(), subjects.WORKERS_STREAM):
        event = worker_event_decoder.decode(record.data)
        if isinstance(event, WorkerLost) and event.worker_id == worker_id:
            found.append((record.time.timestamp(), event))
    return found


async def test_killed_worker_is_lost_when_its_connection_closes_not_after_three_heartbeats(tmp_path: Path) -> None:
    async with running_stack(tmp_path, ["a", "b"]) as stack:
        await _killed_worker_is_lost_by_its_connection(stack)


async def _killed_worker_is_lost_by_its_connection(stack: LocalStack) -> None:
    nc = await connect(stack.nats_url, name="test-worker-loss")
    try:
        async with HttpClient(stack.http_url, api_key=stack.operator_key) as http:
            await _beating_every(nc, http, INTERVAL_S)
            job_id, worker_id = await _running_job(http, sleep_s=4)
            victim = next(w for w in await http.workers() if w.id == worker_id)
            killed_at_s = time.time()
            stack.children[f"worker-{victim.name}"].kill()

            done = await http.wait(job_id, timeout_s=60)
            assert (done.status, done.attempt) == ("completed", 2)
            assert done.worker_id not in (None, worker_id)
            requeued = [r.event.reason for r in await http.events(job_id) if isinstance(r.event, JobRequeued)]
            assert requeued == ["worker_lost"]

            [(lost_at_s, lost)] = await _losses(nc, worker_id)
            assert "connection closed" in lost.reason, lost.reason
            # Silence could not have done it this early: two intervals at the least after the kill.
            assert lost_at_s - killed_at_s < 2 * INTERVAL_S, f"lost {lost_at_s - killed_at_s:.2f}s after the kill"
            assert (await http.worker(worker_id)).status == "lost"
    finally:
        await nc.close()


async def test_a_worker_whose_connection_drops_and_opens_again_keeps_its_job(tmp_path: Path) -> None:
    """A network blip, played by closing the worker's connection from the server (a kick): the worker
    reconnects at once, so it is not lost, and its job completes in its first attempt."""
    async with running_stack(tmp_path, ["a", "b"]) as stack:
        await _kicked_worker_keeps_its_job(stack)


async def _kicked_worker_keeps_its_job(stack: LocalStack) -> None:
    nc = await connect(stack.nats_url, name="test-worker-loss")
    system = await connect(stack.brokers[0].url_as("system"), name="test-worker-loss-system")
    try:
        async with HttpClient(stack.http_url, api_key=stack.operator_key) as http:
            await _beating_every(nc, http, INTERVAL_S)
            job_id, worker_id = await _running_job(http, sleep_s=3 * INTERVAL_S)
            victim = next(w for w in await http.workers() if w.id == worker_id)
            connz = json.loads((await system.request("$SYS.REQ.SERVER.PING.CONNZ", b"{}", timeout=5)).data)
            server_id = connz["server"]["id"]
            [cid] = [c["cid"] for c in connz["data"]["connections"] if c.get("name") == f"gpu-worker-{victim.name}"]
            kicked = json.loads((await system.request(subjects.kick_subject(server_id), json.dumps({"cid": cid}).encode(),
                                                      timeout=5)).data)
            assert "error" not in kicked, kicked

            done = await http.wait(job_id, timeout_s=60)
            assert (done.status, done.attempt, done.worker_id) == ("completed", 1, worker_id)
            assert await _losses(nc, worker_id) == []
            assert (await http.worker(worker_id)).status == "online"
    finally:
        await system.close()
        await nc.close()
