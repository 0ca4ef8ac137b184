"""End to end: the platform as `gpuctl up` runs it (every component a process, a real nats-server),
driven through the SDK and HTTP the way a user would."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import httpx
import msgspec
import pytest

from sdk import subjects
from sdk.api import Accepted, ReportCompleted, ReportFailed, ReportStarted, WorkerCredentials
from sdk.client import Client
from sdk.connection import connect, request
from sdk.errors import InvalidTransition, JobNotFound, StaleAttempt, Unavailable
from sdk.events import ErrorInfo, event_type
from sdk.http import HttpClient
from sdk.local import LocalStack
from sdk.signing import sign
from tests.conftest import HEARTBEAT_INTERVAL_S, running_stack, wait_until

pytestmark = pytest.mark.slow


async def jobs_stream_last_seq(nats_url: str) -> int:
    nc = await connect(nats_url, name="test-inspect")
    try:
        info = await nc.jetstream().stream_info(subjects.JOBS_STREAM)
        return info.state.last_seq
    finally:
        await nc.close()


async def test_200_echo_jobs_all_complete_exactly_once(client: Client) -> None:
    submitted = await asyncio.gather(*(client.submit("echo", params={"n": i}) for i in range(200)))
    done = await asyncio.gather(*(client.wait(s.id, timeout_s=60) for s in submitted))

    assert [d.status for d in done] == ["completed"] * 200
    assert [d.result for d in done] == [{"n": i} for i in range(200)]
    histories = await asyncio.gather(*(client.events(s.id) for s in submitted))
    completed_counts = collections.Counter(
        sum(1 for record in history if event_type(record.event) == "job.completed") for history in histories
    )
    assert completed_counts == {1: 200}


async def test_job_moves_to_a_second_worker_when_its_worker_is_killed(stack: LocalStack, client: Client) -> None:
    job = await client.submit("echo", params={"sleep_s": 4})

    async def running() -> bool:
        return (await client.get(job.id, min_seq=job.seq)).status == "running"

    await wait_until(running, 20, "the job to start")
    first = await client.get(job.id, min_seq=job.seq)
    victim = next(w for w in await client.workers() if w.id == first.worker_id)
    child = stack.children[f"worker-{victim.name}"]
    child.kill()
    try:
        done = await client.wait(job.id, timeout_s=40)
        assert done.status == "completed"
        assert done.attempt == 2
        assert done.worker_id not in (None, first.worker_id)
        history = [event_type(record.event) for record in await client.events(job.id)]
        kinds = [kind for kind in history if kind != "job.progress"]
        assert kinds == [
            "job.submitted", "job.assigned", "job.started", "job.requeued",
            "job.assigned", "job.started", "job.completed",
        ]
        assert (await client.worker(first.worker_id)).status == "lost"
    finally:
        stack.start_worker(victim.name)

        async def back() -> bool:
            return (await client.worker(first.worker_id)).status == "online"

        await wait_until(back, 30, "the killed worker to come back")


async def test_two_schedulers_never_assign_a_job_twice(stack: LocalStack, client: Client) -> None:
    stack.service("scheduler-2", ["scheduler"])
    try:
        first = await asyncio.gather(*(client.submit("echo", params={"i": i}) for i in range(50)))
        # Kill the original scheduler mid-run: the standby takes over and the rest still completes.
        stack.children["scheduler"].kill()
        second = await asyncio.gather(*(client.submit("echo", params={"i": i}) for i in range(50)))
        jobs = first + second
        done = await asyncio.gather(*(client.wait(s.id, timeout_s=60) for s in jobs))
        assert {d.status for d in done} == {"completed"}
        for s in jobs:
            history = await client.events(s.id)
            assignments = collections.Counter(r.event.attempt for r in history if event_type(r.event) == "job.assigned")
            assert all(count == 1 for count in assignments.values()), (s.id, assignments)
    finally:
        stack.children["scheduler"].start()
        stack.children.pop("scheduler-2").stop()


async def test_same_idempotency_key_gives_one_job(stack: LocalStack, client: Client, http: HttpClient) -> None:
    before = await jobs_stream_last_seq(stack.nats_url)
    a = await client.submit("echo", idempotency_key="order-42")
    b = await client.submit("echo", idempotency_key="order-42")
    c = await http.submit("echo", idempotency_key="order-42")
    assert a.id == b.id == c.id
    assert (a.created, b.created, c.created) == (True, False, False)
    await client.wait(a.id, timeout_s=30)
    history = await client.events(a.id)
    assert sum(1 for r in history if event_type(r.event) == "job.submitted") == 1
    assert (await jobs_stream_last_seq(stack.nats_url)) > before


async def operator_headers(stack: LocalStack) -> dict[str, str]:
    """An operator's `Authorization` header, for requests made without the SDK."""
    async with httpx.AsyncClient(base_url=stack.http_url) as raw:
        tokens = (await raw.post("/api/v1/auth/token", json={"api_key": stack.operator_key})).json()
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def test_http_errors_have_status_and_reason_and_append_nothing(stack: LocalStack, http: HttpClient) -> None:
    async with httpx.AsyncClient(base_url=stack.http_url, headers=await operator_headers(stack)) as raw:
        job = await http.submit("echo")
        await http.wait(job.id, timeout_s=30)
        before = await jobs_stream_last_seq(stack.nats_url)

        bad_bodies = [
            b"{", b"[]", b'"echo"', b'{"type": "sing"}', b'{"type": "echo", "timeout_s": -1}',
            b'{"type": "echo", "priority": "high"}', b'{"type": "llm"}', b'{"type": "echo", "region": "eu.west"}',
            b'{"type": "echo", "max_attempts": 0}', b'{"type": "echo", "surprise": 1}',
            b'{"type": "echo", "params": {"x": "' + b"a" * 2_000_000 + b'"}}',
        ]
        for body in bad_bodies:
            response = await raw.post("/api/v1/jobs", content=body, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500, (body[:60], response.status_code)
            assert response.json()["message"], body[:60]

        missing = await raw.get("/api/v1/jobs/no-such-job")
        assert missing.status_code == 404
        assert missing.json()["code"] == "job_not_found"
        assert (await raw.post("/api/v1/jobs/no-such-job/cancel")).status_code == 404
        assert (await raw.get("/api/v1/workers/no-such-worker")).status_code == 404
        finished = await raw.post(f"/api/v1/jobs/{job.id}/cancel")
        assert finished.status_code == 409
        assert "completed" in finished.json()["message"]
        assert (await raw.get("/api/v1/jobs?limit=0")).status_code == 400
        assert (await raw.get("/api/v1/jobs?status=bogus")).status_code == 400
        assert (await raw.get("/api/v1/jobs?cursor=zzz")).status_code == 400
        assert (await jobs_stream_last_seq(stack.nats_url)) == before

    with pytest.raises(InvalidTransition):
        await http.cancel(job.id)
    with pytest.raises(JobNotFound):
        await http.get("no-such-job")


async def test_cancel_a_queued_and_a_running_job(stack: LocalStack, client: Client) -> None:
    running = await client.submit("echo", params={"sleep_s": 30})

    async def started() -> bool:
        return (await client.get(running.id, min_seq=running.seq)).status == "running"

    await wait_until(started, 20, "the job to start")
    assert (await client.cancel(running.id)).status == "cancel_requested"
    done = await client.wait(running.id, timeout_s=20)
    assert done.status == "cancelled"

    # With no scheduler running, a job stays queued; cancelling it needs no worker.
    stack.children["scheduler"].stop()
    try:
        queued = await client.submit("echo")
        accepted = await client.cancel(queued.id)
        assert accepted.status == "cancelled"
        assert (await client.wait(queued.id, timeout_s=20)).status == "cancelled"
    finally:
        stack.children["scheduler"].start()
    assert [event_type(r.event) for r in await client.events(queued.id)] == ["job.submitted", "job.cancelled"]


def signed_by(stack: LocalStack, worker_id: str, subject: str, report: msgspec.Struct) -> tuple[bytes, dict[str, str]]:
    """A report's body and signature headers as the stack's worker `worker_id` would send them."""
    for path in (stack.data_dir / "workers").glob("*/credentials.json"):
        creds = msgspec.json.decode(path.read_bytes(), type=WorkerCredentials)
        if creds.worker_id == worker_id:
            body = msgspec.json.encode(report)
            return body, sign(bytes.fromhex(creds.hmac_secret_hex), subject, body)
    raise AssertionError(f"no credentials of worker {worker_id}")


async def test_a_report_about_a_stale_attempt_is_refused(stack: LocalStack, client: Client) -> None:
    job = await client.submit("echo")
    done = await client.wait(job.id, timeout_s=30)
    assert done.worker_id is not None
    other_id = next(w.id for w in await client.workers() if w.name in ("w1", "w2") and w.id != done.worker_id)
    before = await jobs_stream_last_seq(stack.nats_url)
    # As the platform's user: reports on both workers' subjects (a worker's own identity reaches only its own).
    nc = await connect(stack.nats_url, name="test-stale-worker")

    async def report(worker_id: str, body: msgspec.Struct) -> Accepted:
        subject = subjects.report_subject(worker_id)
        data, headers = signed_by(stack, worker_id, subject, body)
        return await request(nc, subject, data, Accepted, headers=headers)

    try:
        with pytest.raises((StaleAttempt, InvalidTransition)):
            await report(done.worker_id, ReportCompleted(job_id=job.id, attempt=1, result="twice"))
        with pytest.raises(StaleAttempt):
            await report(done.worker_id, ReportStarted(job_id=job.id, attempt=7))
        with pytest.raises(StaleAttempt):
            await report(other_id, ReportCompleted(job_id=job.id, attempt=1, result="theirs"))
        # An ending that carries its start (a short job's one request) is refused whole: no start either.
        with pytest.raises(StaleAttempt):
            await report(done.worker_id, ReportCompleted(job_id=job.id, attempt=2, result="later", with_start=True))
        with pytest.raises(StaleAttempt):
            await report(other_id, ReportFailed(job_id=job.id, attempt=1, error=ErrorInfo(code="x", message="y"),
                                                with_start=True))
        with pytest.raises(InvalidTransition):
            await report(done.worker_id, ReportCompleted(job_id=job.id, attempt=1, result="again", with_start=True))
    finally:
        await nc.close()
    assert (await jobs_stream_last_seq(stack.nats_url)) == before
    assert (await client.get(job.id)).result == done.result
    kinds = [event_type(record.event) for record in await client.events(job.id)]
    assert kinds == ["job.submitted", "job.assigned", "job.started", "job.completed"]


async def test_replay_rebuilds_the_same_tables(
    stack: LocalStack, client: Client, http: HttpClient, tmp_path: Path
) -> None:
    from projections.replay import rebuild
    from projections.store import dump, read_positions

    # HEARTBEATS keeps two messages per worker: slow heartbeats down, so the ones the live copy applied
    # are still in the stream when the rebuilds run (on a busy machine, seconds later).
    await http.set_config_defaults({"heartbeat_interval_s": 10.0})

    jobs = await asyncio.gather(*(client.submit("echo", params={"i": i}) for i in range(20)))
    await asyncio.gather(*(client.wait(j.id, timeout_s=30) for j in jobs))
    last = await client.submit("echo", params={"fail": "on purpose"})
    failed = await client.wait(last.id, timeout_s=30)
    assert failed.status == "failed" and failed.error.code == "echo_failed"
    await client.get(last.id, min_seq=failed.seq)  # the live projection has applied everything

    projections = stack.children["projections"]
    projections.stop()
    db = stack.data_dir / "projections.db"
    try:
        # Heartbeats keep arriving while the live copy is stopped: rebuild to exactly its positions.
        live, positions = await dump(db), await read_positions(db)
        rebuilt_db = tmp_path / "rebuilt.db"
        await rebuild(stack.nats_url, rebuilt_db, until=positions)
        assert await dump(rebuilt_db) == live
        db.unlink()
        await rebuild(stack.nats_url, db, until=positions)
        assert await dump(db) == live
    finally:
        projections.start()
        await http.set_config_defaults({"heartbeat_interval_s": HEARTBEAT_INTERVAL_S})

    async def serving_again() -> bool:
        try:
            return (await client.get(last.id)).status == "failed"
        except Unavailable:
            return False

    await wait_until(serving_again, 30, "the restarted projections to answer from the rebuilt file")


async def test_gateway_answers_503_while_nats_is_down_and_recovers(tmp_path: Path) -> None:
    async with running_stack(tmp_path, []) as stack:
        # A token obtained before NATS goes: verifying it needs no NATS, so the answer is about NATS.
        async with httpx.AsyncClient(base_url=stack.http_url, headers=await operator_headers(stack)) as raw:
            assert (await raw.get("/health")).status_code == 200
            assert stack.broker is not None
            stack.broker.stop()

            async def unhealthy() -> bool:
                response = await raw.get("/health")
                return response.status_code == 503 and response.json()["nats"] == "down"

            await wait_until(unhealthy, 15, "503 from /health")
            submit = await raw.post("/api/v1/jobs", json={"type": "echo"})
            assert submit.status_code == 503

            stack.broker.start()

            async def healthy() -> bool:
                return (await raw.get("/health")).status_code == 200

            await wait_until(healthy, 30, "200 from /health after NATS returned")
            assert (await raw.post("/api/v1/jobs", json={"type": "echo"})).status_code == 201


async def test_job_completes_when_its_worker_is_killed_and_back_before_it_is_missed(
    stack: LocalStack, client: Client
) -> None:
    from sdk.events import JobRequeued, heartbeat_decoder

    # Heartbeats far apart while the worker is away, so its restart (seconds: the torch import) fits well
    # inside the interval a closed connection may stay closed (`scheduler.connections`): the platform never
    # declares it lost, and only the restarted worker's heartbeats, which leave the job out, can tell that
    # the job is gone.
    slow_interval_s = 60.0
    workers = [w for w in await client.workers() if w.status == "online"]
    nc = await connect(stack.nats_url, name="test-inspect")
    js = nc.jetstream()

    async def set_heartbeat_interval(interval_s: float | None) -> None:
        for w in workers:
            await client.set_worker_config(w.id, {"heartbeat_interval_s": interval_s})

    async def beating_slowly() -> bool:
        for w in workers:
            last = await js.get_msg(subjects.HEARTBEATS_STREAM, subject=subjects.heartbeat_subject(w.region, w.id),
                                    direct=True)
            if heartbeat_decoder.decode(last.data or b"").interval_s != slow_interval_s:
                return False
        return True

    async def last_worker_seq(worker_id: str) -> int:
        return (await js.get_msg(subjects.WORKERS_STREAM, subject=subjects.worker_subject(worker_id), direct=True)).seq

    victim = None
    try:
        await set_heartbeat_interval(slow_interval_s)
        await wait_until(beating_slowly, 10, "heartbeats at the slow interval")
        job = await client.submit("echo", params={"sleep_s": 3})

        async def running() -> bool:
            return (await client.get(job.id, min_seq=job.seq)).status == "running"

        await wait_until(running, 20, "the job to start")
        first = await client.get(job.id, min_seq=job.seq)
        victim = next(w for w in workers if w.id == first.worker_id)
        seq_before = await last_worker_seq(victim.id)
        stack.children[f"worker-{victim.name}"].kill()
        stack.start_worker(victim.name)

        async def registered_again() -> bool:
            return await last_worker_seq(first.worker_id) > seq_before

        await wait_until(registered_again, 30, "the killed worker to register again")
        await set_heartbeat_interval(None)  # back to the usual pace: its next heartbeats come at once

        done = await client.wait(job.id, timeout_s=30)
        assert (done.status, done.attempt) == ("completed", 2)
        history = [record.event for record in await client.events(job.id)]
        assert [event_type(e) for e in history if event_type(e) != "job.progress"] == [
            "job.submitted", "job.assigned", "job.started", "job.requeued",
            "job.assigned", "job.started", "job.completed",
        ]
        requeued = next(e for e in history if isinstance(e, JobRequeued))
        assert requeued.reason == "not_held_by_worker"  # not "worker_lost": nobody missed the worker
        assert (await client.worker(victim.id)).status == "online"
    finally:
        await nc.close()
        await set_heartbeat_interval(None)
        if victim is not None:
            restarted = victim.id

            async def online() -> bool:
                return (await client.worker(restarted)).status == "online"

            await wait_until(online, 30, "the restarted worker to be online")
