"""`gpuctl verify`: is the log sound, and do the read models say what a fresh fold says?

`verify(nats)` folds JOBS and WORKERS from their first message with the core's own functions
(`sdk.history.Fold`: `sdk.jobs.apply`, `sdk.workers.apply_worker`) in the order the server stored them,
and returns every violation with its stream, sequence and subject: an impossible transition, a second
terminal event, an outcome from a superseded attempt, an assignment to a worker that was not registered
and alive, a message that is no event, an event on another aggregate's subject. Then it reads the
projections' read models through their query API (`proj.jobs.list`, `proj.workers.list`, after the log's
end with `min_seq`) and reports every job or worker whose view differs from the fresh fold.

A platform that is still working moves on while this runs: a view newer than the fold is compared with
its own subject folded up to the view's sequence, and differences are read again for `settle_s` before
they count (the WORKERS read model has no `min_seq` to wait on). The chaos suite calls `verify` after
each round; keep its signature stable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient

from sdk import subjects
from sdk.api import JobPage, JobView, ListWorkers, OwnedListJobs, WorkerPage, WorkerView, job_view
from sdk.archive import archived_jobs
from sdk.connection import connect, request
from sdk.errors import PlatformError
from sdk.history import Fold, Violation, fold_subject, fold_until, stream_end
from sdk.workers import WorkerState

logger = logging.getLogger(__name__)

__all__ = ["Violation", "verify"]

#: How long differences between the read models and the fold may take to go away before they count.
SETTLE_S = 5.0
#: How long the projections may take to answer one page.
QUERY_TIMEOUT_S = 10.0
PAGE = 500
#: The lifecycle fields of a worker's view that come from WORKERS (the rest is telemetry).
WORKER_FIELDS = ("name", "region", "status", "capabilities", "seq")


async def verify(
    nats: NatsClient | str, *, read_models: bool = True, settle_s: float = SETTLE_S, **connect_options: Any
) -> list[Violation]:
    """Every violation in the log (and, with `read_models`, in the projections' read models), oldest first.

    `nats`: a connection as the `platform` user, or a URL to connect with (credentials in the URL, or
    `user=` / `password=` among `connect_options`). An empty list means sound."""
    nc = nats if isinstance(nats, NatsClient) else await connect(nats, name="verify", **connect_options)
    try:
        js = nc.jetstream()
        ends = {stream: await stream_end(js, stream) for stream in (subjects.JOBS_STREAM, subjects.WORKERS_STREAM)}
        fold = await fold_until(js, ends)
        for job in await archived_jobs(js):  # retention took these out of JOBS; their rows are the snapshot's
            fold.jobs.setdefault(job.id, job)
        violations = list(fold.violations)
        if read_models:
            violations += await _settled_differences(nc, fold, ends, settle_s)
    finally:
        if nc is not nats:
            await nc.close()
    logger.info(
        "verified JOBS to #%d and WORKERS to #%d: %d jobs, %d workers, %d violations",
        ends[subjects.JOBS_STREAM], ends[subjects.WORKERS_STREAM], len(fold.jobs), len(fold.workers), len(violations),
    )
    return violations


async def _settled_differences(nc: NatsClient, fold: Fold, ends: dict[str, int], settle_s: float) -> list[Violation]:
    deadline = time.monotonic() + settle_s
    while True:
        try:
            found = await _differences(nc, fold, ends)
        except PlatformError as exc:
            found = [Violation(kind="read_model", stream="", seq=0, subject="proj.>", message=f"the projections did not answer: {exc.message}")]
        if not found or time.monotonic() >= deadline:
            return found
        await asyncio.sleep(0.5)


async def _differences(nc: NatsClient, fold: Fold, ends: dict[str, int]) -> list[Violation]:
    js = nc.jetstream()
    found: list[Violation] = []
    jobs_end, workers_end = ends[subjects.JOBS_STREAM], ends[subjects.WORKERS_STREAM]
    views = await _job_views(nc, jobs_end)
    for job_id, view in views.items():
        subject = subjects.job_subject(job_id)
        if view.seq <= jobs_end:
            job = fold.jobs.get(job_id)
        else:  # the job moved on after the fold: fold its own subject as far as the view
            job = (await fold_subject(js, subjects.JOBS_STREAM, subject, view.seq)).jobs.get(job_id)
        expected = msgspec.to_builtins(job_view(job)) if job is not None else None
        found += _compare(subjects.JOBS_STREAM, subject, view.seq, expected, msgspec.to_builtins(view))
    for job_id, job in fold.jobs.items():
        if job_id not in views:
            found += _compare(subjects.JOBS_STREAM, subjects.job_subject(job_id), job.seq, msgspec.to_builtins(job_view(job)), None)
    workers = {w.id: w for w in (await request(nc, subjects.PROJ_WORKERS_LIST, ListWorkers(), WorkerPage, timeout_s=QUERY_TIMEOUT_S)).items}
    for worker_id, seen in workers.items():
        subject = subjects.worker_subject(worker_id)
        state = fold.workers.get(worker_id)
        if seen.seq > workers_end:
            state = (await fold_subject(js, subjects.WORKERS_STREAM, subject, seen.seq)).workers.get(worker_id)
        found += _compare(subjects.WORKERS_STREAM, subject, seen.seq, _worker_fields(state), _worker_fields(seen))
    for worker_id, state in fold.workers.items():
        if worker_id not in workers and state.registered:
            found += _compare(subjects.WORKERS_STREAM, subjects.worker_subject(worker_id), state.seq, _worker_fields(state), None)
    return found


async def _job_views(nc: NatsClient, min_seq: int) -> dict[str, JobView]:
    """Every job of the read model, once it has applied JOBS up to `min_seq`."""
    views: dict[str, JobView] = {}
    cursor: str | None = None
    while True:
        query = OwnedListJobs(limit=PAGE, cursor=cursor, min_seq=min_seq or None)
        page = await request(nc, subjects.PROJ_JOBS_LIST, query, JobPage, timeout_s=QUERY_TIMEOUT_S)
        views.update((view.id, view) for view in page.items)
        if page.next_cursor is None:
            return views
        cursor = page.next_cursor


def _worker_fields(worker: WorkerState | WorkerView | None) -> dict[str, Any] | None:
    if worker is None or (isinstance(worker, WorkerState) and not worker.registered):
        return None
    fields = msgspec.to_builtins(worker)
    return {name: fields[name] for name in WORKER_FIELDS}


def _compare(stream: str, subject: str, seq: int, expected: dict[str, Any] | None, seen: dict[str, Any] | None) -> list[Violation]:
    """A `read_model` violation when the read model's view (`seen`) is not the fresh fold's (`expected`)."""
    if expected == seen:
        return []
    if seen is None:
        message = "in the log but missing from the read model"
    elif expected is None:
        message = "in the read model but not in the log"
    else:
        changed = [f"{name}: {seen.get(name)!r} (fold: {value!r})" for name, value in expected.items() if seen.get(name) != value]
        message = "read model differs from a fresh fold: " + "; ".join(changed)
    return [Violation(kind="read_model", stream=stream, seq=seq, subject=subject, message=message[:500])]
