"""`gpuctl events tail|show`: the log as an operator browses it, read as the platform user from the data dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sdk.http import HttpClient
from sdk.local import LocalStack
from tests.test_gpuctl import gpuctl

pytestmark = pytest.mark.slow


def events_cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    assert stack.broker is not None
    return gpuctl("events", *args, "--data-dir", str(stack.data_dir), env={"NATS_URL": stack.broker.address})


async def test_tail_shows_the_latest_events_filtered_by_job_type_and_worker(stack: LocalStack, http: HttpClient) -> None:
    done = await http.wait((await http.submit("echo", params={"tail": 1})).id, timeout_s=30)
    failed = await http.wait((await http.submit("echo", params={"fail": "on purpose"})).id, timeout_s=30)

    table = events_cli(stack, "tail", "--job", done.id)
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if f"jobs.{done.id}" in line]
    assert [next(t for t in row.split() if t.startswith("job.")) for row in rows] == ["job.submitted", "job.assigned", "job.started", "job.completed"]

    lines = events_cli(stack, "tail", "--job", done.id, "--type", "job.completed", "--json")
    [record] = [json.loads(line) for line in lines.stdout.splitlines()]
    assert record["subject"] == f"jobs.{done.id}" and record["event"]["worker_id"] == done.worker_id
    assert record["seq"] == done.seq

    by_worker = events_cli(stack, "tail", "--worker", str(done.worker_id), "--since", "5m", "--json")
    seen = [json.loads(line) for line in by_worker.stdout.splitlines()]
    assert any(r["type"] == "job.completed" and r["subject"] == f"jobs.{done.id}" for r in seen)
    assert all(r["event"].get("worker_id") == done.worker_id for r in seen)

    newest = events_cli(stack, "tail", "-n", "3", "--json")
    assert [(r["subject"], r["type"]) for r in map(json.loads, newest.stdout.splitlines())] == [
        (f"jobs.{failed.id}", kind) for kind in ("job.assigned", "job.started", "job.failed")
    ]

    last = events_cli(stack, "tail", "-n", "1", "--type", "job.failed", "--json")
    [failure] = [json.loads(line) for line in last.stdout.splitlines()]
    assert failure["subject"] == f"jobs.{failed.id}" and failure["event"]["error"]["code"] == failed.error.code


async def test_tail_follow_prints_events_as_they_are_appended(stack: LocalStack, http: HttpClient) -> None:
    assert stack.broker is not None
    env = {**os.environ, "NATS_URL": stack.broker.address, "COLUMNS": "200"}
    env.pop("GF_API_KEY", None)
    # A completed job of this test's own, so the backlog the follower prints first is never empty.
    await http.wait((await http.submit("echo", params={"backlog": True})).id, timeout_s=30)
    follower = subprocess.Popen(
        [sys.executable, "-m", "sdk.ctl", "events", "tail", "--follow", "--json", "-n", "1", "--type", "job.completed",
         "--data-dir", str(stack.data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert follower.stdout is not None
        follower.stdout.readline()  # the backlog's last completed job: the follower is reading
        job = await http.wait((await http.submit("echo", params={"follow": True})).id, timeout_s=30)
        started = time.monotonic()
        line = json.loads(follower.stdout.readline())
        assert line["subject"] == f"jobs.{job.id}" and line["type"] == "job.completed"
        assert time.monotonic() - started < 10
    finally:
        follower.terminate()
        follower.wait(10)


async def test_show_tells_one_jobs_story_with_the_time_between_events(stack: LocalStack, http: HttpClient) -> None:
    job = await http.wait((await http.submit("echo", params={"show": 1})).id, timeout_s=30)
    shown = events_cli(stack, "show", job.id)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    for step in ("submitted -> assigned", "assigned -> started", "started -> completed"):
        assert step in text, text
    assert f"outcome: completed at attempt 1 on worker {job.worker_id}" in text
    assert " ms" in text


def test_bad_input_names_the_bad_value_and_exits_non_zero(stack: LocalStack) -> None:
    for args, named, status in [
        (("show", "no-such-job"), "unknown job id 'no-such-job'", 1),
        (("tail", "--job", "no-such-job"), "unknown job id 'no-such-job'", 1),
        (("tail", "--worker", "no-such-worker"), "unknown worker id 'no-such-worker'", 1),
        (("tail", "--type", "job.exploded"), "unknown event type 'job.exploded'", 2),
        (("tail", "--since", "yesterday"), "--since 'yesterday'", 2),
    ]:
        result = events_cli(stack, *args)
        assert result.returncode == status, (args, result.stderr)
        assert named in " ".join(result.stderr.split()), (args, result.stderr)
