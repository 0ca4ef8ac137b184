"""Retention: jobs finished long ago leave the JOBS stream for an archive in the export format, and every
fold from the log (replay, a service on an empty file) still gives the same read models, from the
snapshot of their rows plus the rest of the log."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from projections.replay import rebuild
from projections.service import Projections
from projections.store import dump
from sdk import subjects
from sdk.archive import Message, read_header, read_lines
from sdk.broker import EmbeddedNats
from sdk.connection import connect
from sdk.events import JobCompleted
from sdk.log import ensure_streams, read_subject
from sdk.verify import verify
from tests.test_projections import EU, caught_up, emit, get_job, tell_story

FINISHED = ("job-a", "job-c", "job-d")  # completed, failed, cancelled in the story
LIVE = ("job-b", "job-e", "job-f")  # running, queued, assigned


@pytest.fixture
async def log_nc(fresh_nats: EmbeddedNats) -> AsyncIterator[NatsClient]:
    nc = await connect(fresh_nats.url, name="test-retention")
    await ensure_streams(nc.jetstream())
    yield nc
    await nc.close()


async def gpuctl_retention(nats_url: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sdk.ctl", "retention", *args, env={**os.environ, "NATS_URL": nats_url, "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, " ".join(out.decode().split())


async def test_finished_jobs_are_archived_and_purged_and_replay_gives_the_same_read_models(
    fresh_nats: EmbeddedNats, log_nc: NatsClient, tmp_path: Path
) -> None:
    client = log_nc
    js = client.jetstream()
    story = await tell_story(js)
    db = tmp_path / "read-models.db"
    live = Projections(client, db)
    await live.start()
    try:
        await caught_up(live, story.last)
        # Nothing finished an hour ago: nothing to do.
        code, out = await gpuctl_retention(fresh_nats.url, "--older-than-s", "3600", "--db", str(db))
        assert code == 0 and out.endswith("no job finished more than 3600s ago"), out

        archive = tmp_path / "archive.jsonl.gz"
        code, out = await gpuctl_retention(
            fresh_nats.url, "--older-than-s", "0", "--db", str(db), "--out", str(archive)
        )
        assert code == 0, out
        assert f"archived 3 jobs (9 messages) to {archive}" in out

        for job_id in FINISHED:
            assert await read_subject(js, subjects.JOBS_STREAM, subjects.job_subject(job_id)) == []
            assert (await get_job(client, job_id)).status in ("completed", "failed", "cancelled")  # rows kept
        for job_id in LIVE:
            assert await read_subject(js, subjects.JOBS_STREAM, subjects.job_subject(job_id))
        # The archive is an export of those jobs' messages, at their sequences.
        assert [s.name for s in read_header(archive).streams] == [subjects.JOBS_STREAM]
        archived = [line for line in read_lines(archive) if isinstance(line, Message)]
        assert {m.subject for m in archived} == {subjects.job_subject(j) for j in FINISHED}
        assert [m.seq for m in archived] == sorted(m.seq for m in archived)

        # `gpuctl verify` starts from the snapshots too: the archived rows equal its fold, and only the
        # story's stale report (job-b, still in the log) is reported.
        assert [(v.kind, v.subject) for v in await verify(client)] == [("stale_attempt", "jobs.job-b")]

        # Running again archives nothing new; the log goes on.
        code, out = await gpuctl_retention(fresh_nats.url, "--older-than-s", "0", "--db", str(db))
        assert code == 0 and out.endswith("no job finished more than 0s ago"), out
        done = await emit(js, JobCompleted(job_id="job-b", worker_id=EU, attempt=2, result="4"))
        await live.wait_for(subjects.JOBS_STREAM, done, timeout_s=10)
    finally:
        await live.stop()
    before = await dump(db)
    assert {row[0] for row in before["jobs"]} == {*FINISHED, *LIVE}

    # Replay: the snapshot's rows, then the rest of the log.
    await rebuild(fresh_nats.url, tmp_path / "replayed.db")
    assert await dump(tmp_path / "replayed.db") == before
    # A service that starts on an empty file does the same.
    fresh = Projections(client, tmp_path / "fresh.db")
    await fresh.start()
    try:
        await caught_up(fresh, {**story.last, subjects.JOBS_STREAM: done})
    finally:
        await fresh.stop()
    assert await dump(tmp_path / "fresh.db") == before

    # The next run archives job-b (its 8 events, the stale report included), into the object store this time.
    code, out = await gpuctl_retention(fresh_nats.url, "--older-than-s", "0", "--db", str(db))
    assert code == 0 and "archived 1 jobs (8 messages) to archive/jobs-" in out, out
    await rebuild(fresh_nats.url, tmp_path / "replayed-again.db")
    assert await dump(tmp_path / "replayed-again.db") == before


async def test_retention_refuses_a_file_of_another_version(fresh_nats: EmbeddedNats, tmp_path: Path) -> None:
    not_read_models = tmp_path / "other.db"
    not_read_models.write_bytes(b"")
    code, out = await gpuctl_retention(fresh_nats.url, "--older-than-s", "0", "--db", str(not_read_models))
    assert code == 1 and f"{not_read_models} holds read models of versions None" in out, out
    assert not_read_models.read_bytes() == b""  # left as it was
