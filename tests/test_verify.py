"""`gpuctl verify` and `sdk.verify.verify`: a clean run of real jobs is sound; each kind of bad event,
written straight to the stream as only the platform's own NATS user could, is reported with its
sequence and subject; a read model changed behind the projections' back differs from a fresh fold."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sdk import subjects
from sdk.events import ErrorInfo, JobAssigned, JobCompleted, JobFailed, JobRequeued, JobStarted
from sdk.http import HttpClient
from sdk.local import LocalStack
from sdk.log import append
from sdk.verify import verify
from tests.conftest import platform_nc, running_stack
from tests.test_gpuctl import gpuctl

pytestmark = pytest.mark.slow


@pytest.fixture
async def platform(tmp_path: Path) -> AsyncIterator[LocalStack]:
    """A platform of each test's own: one test writes bad events into its log, which no later verify of
    a clean run may see."""
    async with running_stack(tmp_path / "verify", ["w1"]) as stack:
        yield stack


@pytest.fixture
async def operator(platform: LocalStack) -> AsyncIterator[HttpClient]:
    async with HttpClient(platform.http_url, api_key=platform.operator_key) as http:
        yield http


def verify_cli(platform: LocalStack, *args: str) -> tuple[int, str]:
    """`gpuctl verify` as an operator on the platform's machine: the server's address, the data dir."""
    assert platform.broker is not None
    result = gpuctl("verify", "--data-dir", str(platform.data_dir), *args, env={"NATS_URL": platform.broker.address})
    return result.returncode, " ".join((result.stdout + result.stderr).split())


async def test_a_clean_run_of_real_jobs_verifies_sound(platform: LocalStack, operator: HttpClient) -> None:
    for n in range(3):
        await operator.wait((await operator.submit("echo", params={"n": n})).id, timeout_s=30)
    queued = await operator.submit("image", model="nobody-serves-this", timeout_s=3600)
    await operator.cancel(queued.id)

    assert await verify(platform.nats_url) == []
    status, output = verify_cli(platform)
    assert status == 0, output
    assert "sound" in output


async def test_each_bad_event_written_to_the_stream_is_reported(platform: LocalStack, operator: HttpClient) -> None:
    done = await operator.wait((await operator.submit("echo", params={"n": "done"})).id, timeout_s=30)
    tampered = await operator.wait((await operator.submit("echo", params={"n": "tampered"})).id, timeout_s=30)
    assert done.worker_id is not None
    # No echo-only worker can take an image job: it stays queued, so the scheduler leaves it to us.
    stuck = await operator.submit("image", model="nobody-serves-this", timeout_s=3600)

    assert platform.broker is not None
    async with platform_nc(platform.broker, "test-bad-writer") as nc:  # the platform's own user
        js = nc.jetstream()
        done_subject, stuck_subject = subjects.job_subject(done.id), subjects.job_subject(stuck.id)
        again = await append(js, done_subject, JobCompleted(job_id=done.id, worker_id=done.worker_id, attempt=1))
        restart = await append(js, done_subject, JobStarted(job_id=done.id, worker_id=done.worker_id, attempt=1))
        ghost = await append(js, stuck_subject, JobAssigned(job_id=stuck.id, worker_id="ghost", region="local", attempt=1))
        await append(js, stuck_subject, JobRequeued(job_id=stuck.id, attempt=2, reason="test"))
        late = await append(js, stuck_subject, JobCompleted(job_id=stuck.id, worker_id="ghost", attempt=1))
        late_failure = await append(
            js, stuck_subject,
            JobFailed(job_id=stuck.id, worker_id="ghost", attempt=1, error=ErrorInfo(code="x", message="late")),
        )
    # A read model changed behind the projections' back (a disk error, a hand-made edit).
    with sqlite3.connect(platform.data_dir / "projections.db") as db:
        db.execute("UPDATE jobs SET status = 'failed' WHERE id = ?", (tampered.id,))

    found = {(v.kind, v.seq, v.subject) for v in await verify(platform.nats_url, settle_s=1)}
    assert ("duplicate_terminal", again.seq, done_subject) in found
    assert ("invalid_transition", restart.seq, done_subject) in found
    assert ("dead_worker", ghost.seq, stuck_subject) in found
    assert ("stale_attempt", late.seq, stuck_subject) in found
    assert ("stale_attempt", late_failure.seq, stuck_subject) in found
    assert ("read_model", tampered.seq, subjects.job_subject(tampered.id)) in found

    status, output = verify_cli(platform)
    assert status == 1, output
    for seq in (again.seq, restart.seq, ghost.seq, late.seq, late_failure.seq):
        assert f" {seq} " in output, (seq, output)
    assert "'failed' (fold: 'completed')" in output
