"""Read-model upgrades: projections that start on a file of another version keep answering from it while
they fold the new one from the log, then switch, and `gpuctl projections status` shows where they are."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from bench.replay import fill
from projections.replay import rebuild
from projections.service import Projections
from projections.store import MODEL_VERSIONS, dump, file_versions
from sdk import subjects
from sdk.api import GetJob, JobView
from sdk.api.projections import GetProjectionsStatus, ProjectionsStatus
from sdk.broker import NATS_CONF, EmbeddedNats
from sdk.connection import connect, request
from sdk.events import JobCancelled
from tests.test_projections import caught_up, emit, tell_story

#: Job lifecycles (4 events each) after the story: enough that folding them takes a while.
BULK_JOBS = 5_000
#: The projections and the test share one event loop, which a batch of 10,000 events holds for a while
#: on a loaded machine: the test's requests wait longer than a client's default.
READ_TIMEOUT_S = 30.0


@pytest.fixture
def quick_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """nats.conf without the fsync per write: this test is about the read models, and fills the log fast."""
    config = tmp_path / "nats-no-fsync.conf"
    config.write_text(NATS_CONF.read_text().replace("sync_interval: always", ""))
    server = EmbeddedNats(tmp_path / "nats", config=config)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def nc(quick_nats: EmbeddedNats) -> AsyncIterator[NatsClient]:
    client = await connect(quick_nats.url, name="test-upgrade")
    yield client
    await client.close()


async def status(nc: NatsClient) -> ProjectionsStatus:
    return await request(nc, subjects.PROJ_STATUS, GetProjectionsStatus(), ProjectionsStatus, timeout_s=READ_TIMEOUT_S)


async def read_job(nc: NatsClient, job_id: str, **options: Any) -> JobView:
    return await request(nc, subjects.PROJ_JOBS_GET, GetJob(id=job_id, **options), JobView, timeout_s=READ_TIMEOUT_S)


@pytest.mark.slow
async def test_a_new_version_is_folded_beside_the_old_one_while_reads_continue(
    quick_nats: EmbeddedNats, nc: NatsClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdk.log import ensure_streams

    js = nc.jetstream()
    await ensure_streams(js)
    await tell_story(js)
    await fill(nc, BULK_JOBS)
    jobs_end = (await js.stream_info(subjects.JOBS_STREAM)).state.last_seq
    db = tmp_path / "read-models.db"
    first = Projections(nc, db)
    await first.start()
    await caught_up(first, {subjects.JOBS_STREAM: jobs_end})
    assert (await status(nc)).upgrade is None
    await first.stop()
    old_version = MODEL_VERSIONS["jobs"]

    # The jobs model's fold changed: its version goes up, and the projections start on the old file.
    monkeypatch.setitem(MODEL_VERSIONS, "jobs", old_version + 1)
    # A write the old file never saw: a read that asks for it waits for the new file.
    cancelled = await emit(js, JobCancelled(job_id="job-e", reason="after the old file stopped"))
    second = Projections(nc, db, min_seq_wait_s=READ_TIMEOUT_S - 5)
    await second.start()
    reader = await connect(quick_nats.url, name="test-upgrade-reader")  # a client of its own, as users are
    try:
        seen_during_upgrade = []
        while True:
            job_a, job_e = await read_job(reader, "job-a"), await read_job(reader, "job-e")
            assert (job_a.status, job_a.result) == ("completed", {"text": "hi"})
            if (report := await status(reader)).upgrade is None:
                break
            # Still upgrading after those reads: they were answered by the old file, frozen where it stood.
            assert job_e.status == "queued"
            jobs = {m.name: m for m in report.models}["jobs"]
            assert (jobs.version, jobs.serving_version) == (old_version + 1, old_version)
            assert sum(report.upgrade.targets.values()) > 0
            seen_during_upgrade.append(report.upgrade.positions.get(subjects.JOBS_STREAM, 0))
        assert seen_during_upgrade, "the upgrade ended before one read could be made during it"
        # The write made during the upgrade is in the new file, which now answers.
        assert (await read_job(reader, "job-e", min_seq=cancelled)).status == "cancelled"
        report = await status(reader)
        assert {m.name: (m.version, m.serving_version) for m in report.models}["jobs"] == (old_version + 1,) * 2
        assert all(s.lag == 0 for s in report.streams if s.stream != subjects.HEARTBEATS_STREAM)
    finally:
        await reader.close()
        await second.stop()
    assert await file_versions(db) == {**MODEL_VERSIONS}
    assert not (tmp_path / "read-models.db.upgrade").exists()
    await rebuild(quick_nats.url, tmp_path / "fresh.db")
    assert await dump(db) == await dump(tmp_path / "fresh.db")


async def test_gpuctl_projections_status_shows_versions_positions_and_lag(
    quick_nats: EmbeddedNats, nc: NatsClient, tmp_path: Path
) -> None:
    from sdk.log import ensure_streams

    js = nc.jetstream()
    await ensure_streams(js)
    story = await tell_story(js)
    projections = Projections(nc, tmp_path / "read-models.db")
    await projections.start()
    try:
        await caught_up(projections, story.last)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sdk.ctl", "projections", "status",
            env={**os.environ, "NATS_URL": quick_nats.url, "COLUMNS": "200"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await projections.stop()
    text = out.decode()
    assert proc.returncode == 0, text
    lines = [" ".join(line.replace("│", " ").split()) for line in text.splitlines()]
    assert f"jobs {MODEL_VERSIONS['jobs']} {MODEL_VERSIONS['jobs']}" in lines
    assert f"JOBS {story.last['JOBS']} {story.last['JOBS']} 0" in lines
    assert "no upgrade in progress" in lines
