"""`gpuctl export` and `gpuctl import`: the whole log to a file and into another, empty platform, with
the same messages at the same sequences, so the read models folded on both sides are equal."""

from __future__ import annotations

import asyncio
import gzip
import os
import sys
from pathlib import Path

import msgspec
import pytest

from projections.replay import rebuild
from projections.service import Projections
from projections.store import dump
from sdk import subjects
from sdk.archive import ExportHeader, Message, read_header
from sdk.broker import EmbeddedNats
from sdk.client import Client
from sdk.connection import connect
from sdk.events import JobSubmitted
from sdk.http import HttpClient
from sdk.local import LocalStack
from sdk.log import append, ensure_streams, read_subject
from sdk.verify import verify
from tests.conftest import HEARTBEAT_INTERVAL_S
from tests.test_projections import emit, tell_story


async def gpuctl(*args: str, nats_url: str) -> tuple[int, str]:
    """`gpuctl ARGS` in a process of its own, as an operator runs it, against `nats_url`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sdk.ctl", *args, env={**os.environ, "COLUMNS": "200", "NATS_URL": nats_url},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, " ".join(out.decode().split())


def header_positions(export: Path) -> dict[str, int]:
    """The last sequence of each folded stream in an export: where its read models stand."""
    header = read_header(export)
    folded = (subjects.JOBS_STREAM, subjects.WORKERS_STREAM, subjects.HEARTBEATS_STREAM)
    return {s.name: s.last_seq for s in header.streams if s.name in folded and s.last_seq}


async def test_round_trip_keeps_sequences_gaps_headers_buckets_and_read_models(
    fresh_nats: EmbeddedNats, tmp_path: Path
) -> None:
    source_dir, target_dir = tmp_path / "source", tmp_path / "target"
    with EmbeddedNats(source_dir) as source:
        nc = await connect(source.url, name="test-archive-source")
        js = nc.jetstream()
        await ensure_streams(js)
        story = await tell_story(js)
        # A gap: a message deleted from the middle of JOBS (as retention does), then an idempotent submit.
        doomed = await emit(js, JobSubmitted(job_id="job-doomed", job_type="echo"))
        await js.delete_msg(subjects.JOBS_STREAM, doomed)
        keyed = await append(js, subjects.job_subject("job-keyed"), JobSubmitted(job_id="job-keyed", job_type="echo"),
                             expected_seq=0, msg_id="key-1")
        await (await js.key_value(subjects.WORKER_CONFIG_BUCKET)).put("_defaults", b'{"max_concurrency": 2}')
        await (await js.object_store(subjects.RESULTS_BUCKET)).put("job-a/image.png", b"\x89PNG" + bytes(300_000))
        job_b = await read_subject(js, subjects.JOBS_STREAM, subjects.job_subject("job-b"))
        source_violations = await verify(nc, read_models=False)
        await nc.close()
        export = tmp_path / "backup.jsonl.gz"
        code, out = await gpuctl("export", "--out", str(export), "--data-dir", str(source_dir), nats_url=source.url)
        assert code == 0, out
        assert f"to {export}" in out
        source_db = tmp_path / "source.db"
        await rebuild(source.url, source_db)

    with gzip.open(export, "rb") as file:
        lines = file.read().splitlines()
    header = msgspec.json.decode(lines[0], type=ExportHeader)
    assert [s.name for s in header.streams] == sorted(s.name for s in header.streams)
    assert "KV_scheduler-lease" not in {s.name for s in header.streams}
    jobs = [m for m in (msgspec.json.decode(raw, type=Message) for raw in lines[1:-1]) if m.stream == "JOBS"]
    assert doomed not in {m.seq for m in jobs} and jobs[-1].seq == keyed.seq

    code, out = await gpuctl("import", str(export), "--data-dir", str(target_dir), nats_url=fresh_nats.url)
    assert code == 0, out
    nc = await connect(fresh_nats.url, name="test-archive-target")
    try:
        js = nc.jetstream()
        info = (await js.stream_info(subjects.JOBS_STREAM)).state
        assert (info.last_seq, info.messages) == (keyed.seq, keyed.seq - 1)  # same sequences, the gap kept
        msg = await js.get_msg(subjects.JOBS_STREAM, seq=keyed.seq, direct=True)
        assert msg.headers and msg.headers[subjects.MSG_ID_HEADER] == "key-1"
        assert msg.headers[subjects.EVENT_TYPE_HEADER] == "job.submitted"
        # The idempotency key is still known: a retried submit is a duplicate, not a second job.
        retried = await js.publish(subjects.job_subject("job-keyed"), msg.data, headers={subjects.MSG_ID_HEADER: "key-1"})
        assert retried.duplicate and retried.seq == keyed.seq
        config = await (await js.key_value(subjects.WORKER_CONFIG_BUCKET)).get("_defaults")
        assert config.value == b'{"max_concurrency": 2}'
        image = await (await js.object_store(subjects.RESULTS_BUCKET)).get("job-a/image.png")
        assert image.data == b"\x89PNG" + bytes(300_000)
        assert await read_subject(js, subjects.JOBS_STREAM, subjects.job_subject("job-b")) == job_b
    finally:
        await nc.close()
    target_db = tmp_path / "target.db"
    assert await rebuild(fresh_nats.url, target_db) == {**story.last, subjects.JOBS_STREAM: keyed.seq}
    assert await dump(target_db) == await dump(source_db)
    # `gpuctl verify` says so too: the same findings in the log (the story's stale report, at the same
    # sequence), and read models served from the imported log equal to a fresh fold of it.
    assert [v.kind for v in source_violations] == ["stale_attempt"]
    nc = await connect(fresh_nats.url, name="test-archive-verify")
    projections = Projections(nc, tmp_path / "served.db")
    await projections.start()
    try:
        assert await verify(nc) == source_violations
    finally:
        await projections.stop()
        await nc.close()

    # The platform is no longer empty: a second import is refused and writes nothing.
    code, out = await gpuctl("import", str(export), "--data-dir", str(target_dir), nats_url=fresh_nats.url)
    assert code == 1
    assert "the platform is not empty (" in out and "JOBS holds 20 messages" in out and "Traceback" not in out
    nc = await connect(fresh_nats.url, name="test-archive-target")
    try:
        assert (await nc.jetstream().stream_info(subjects.JOBS_STREAM)).state.last_seq == keyed.seq
    finally:
        await nc.close()


async def test_a_cut_short_or_foreign_file_is_refused(fresh_nats: EmbeddedNats, tmp_path: Path) -> None:
    nc = await connect(fresh_nats.url, name="test-archive-refused")
    await ensure_streams(nc.jetstream())
    whole = tmp_path / "whole.jsonl.gz"
    code, out = await gpuctl("export", "--out", str(whole), "--data-dir", str(tmp_path), nats_url=fresh_nats.url)
    assert code == 0, out
    with gzip.open(whole, "rb") as file:
        lines = file.read().splitlines()
    cut = tmp_path / "cut.jsonl.gz"
    with gzip.open(cut, "wb") as file:
        file.write(b"\n".join(lines[:-1]) + b"\n")
    foreign = tmp_path / "foreign.jsonl.gz"
    with gzip.open(foreign, "wb") as file:
        file.write(b'{"hello": "world"}\n')
    plain = tmp_path / "plain.txt"
    plain.write_text("not gzip")

    for path, reason in (
        (cut, "was cut short"),
        (foreign, "line 1: not an export line"),
        (plain, "is not a readable export"),
        (tmp_path / "missing.gz", "no such file"),
    ):
        code, out = await gpuctl("import", str(path), "--data-dir", str(tmp_path), nats_url=fresh_nats.url)
        assert code == 1 and reason in out and "Traceback" not in out, (path, out)
    try:
        assert (await nc.jetstream().stream_info(subjects.JOBS_STREAM)).state.last_seq == 0  # nothing written
    finally:
        await nc.close()


@pytest.mark.slow
async def test_a_real_platforms_log_round_trips_into_a_new_platform(
    stack: LocalStack, client: Client, http: HttpClient, fresh_nats: EmbeddedNats, tmp_path: Path
) -> None:
    # HEARTBEATS keeps two messages per worker: slow them down so the exported ones are still there
    # when the source is refolded up to the export's positions.
    await http.set_config_defaults({"heartbeat_interval_s": 10.0})
    try:
        jobs = await asyncio.gather(*(client.submit("echo", params={"i": i}) for i in range(10)))
        keyed = await client.submit("echo", params={"keyed": True}, idempotency_key="round-trip-key")
        await asyncio.gather(*(client.wait(j.id, timeout_s=30) for j in [*jobs, keyed]))
        export = tmp_path / "platform.jsonl.gz"
        code, out = await gpuctl("export", "--out", str(export), nats_url=stack.nats_url)
        assert code == 0, out
        positions = header_positions(export)
        await rebuild(stack.nats_url, tmp_path / "source.db", until=positions)
    finally:
        await http.set_config_defaults({"heartbeat_interval_s": HEARTBEAT_INTERVAL_S})

    code, out = await gpuctl("import", str(export), nats_url=fresh_nats.url)
    assert code == 0, out
    assert await rebuild(fresh_nats.url, tmp_path / "target.db", until=positions) == positions
    source, target = await dump(tmp_path / "source.db"), await dump(tmp_path / "target.db")
    assert target == source and {row[0] for row in target["jobs"]} >= {j.id for j in jobs}

    # The imported platform still knows the idempotency key: the same submit gives the same job.
    nc = await connect(fresh_nats.url, name="test-archive-keyed")
    try:
        js = nc.jetstream()
        [(data, seq), *_] = await read_subject(js, subjects.JOBS_STREAM, subjects.job_subject(keyed.id))
        msg_id = (await js.get_msg(subjects.JOBS_STREAM, seq=seq, direct=True)).headers[subjects.MSG_ID_HEADER]
        assert "round-trip-key" in msg_id
        again = await js.publish(subjects.job_subject(keyed.id), data, headers={subjects.MSG_ID_HEADER: msg_id})
        assert again.duplicate and again.seq == seq
    finally:
        await nc.close()
