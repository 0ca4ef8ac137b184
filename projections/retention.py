"""Retention: jobs that finished more than `older_than_s` ago leave the JOBS stream, which otherwise
grows forever (`gpuctl retention --older-than-s N`, run from a timer).

One run, in this order, so a crash at any point loses nothing:
1. the candidates are read from the read models (`Store.finished_before`): their rows are final, since
   a finished job takes no more events (a late report is refused by `apply`, with or without its row);
2. their messages are written in the export format (`sdk.archive`) to `--out FILE`, or else to the
   `archive` object store as `jobs-<time>.jsonl.gz`;
3. their rows are stored in the `archive` object store as `jobs-<time>.snapshot.jsonl.gz`;
4. each job's subject is purged from JOBS;
5. the jobs are marked archived in the read models, so the next run passes them by.
A crash before 4 leaves jobs both in the log and in a snapshot, which folds to the same rows (the
snapshot row first, then the log's events, refused as already applied); a crash before 5 has the next
run archive them again, with no messages left and the same rows.

Every fold from the log starts from the snapshots (`load_snapshots`, `sdk.archive.archived_jobs`):
`gpuctl replay`, a projections service on an empty file, a read-model upgrade, `gpuctl verify`. So replay gives the same read models as before the
purge. The trade-off (docs/operations.md, "Retention"): the archived jobs' event-by-event history is
no longer in the log, only in the archive (what `gpuctl events`, time travel and a past-state replay
would need), and the read models keep every row, so their file does not shrink.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

from nats.js import JetStreamContext

from projections.store import MODEL_VERSIONS, Store, file_versions
from sdk import subjects
from sdk.archive import (
    SNAPSHOT_SUFFIX,
    ExportHeader,
    Message,
    StreamHeader,
    archived_jobs,
    encode_snapshot,
    read_stream,
    write_export,
)
from sdk.errors import Conflict
from sdk.jobs import Job

logger = logging.getLogger(__name__)



class Retained(NamedTuple):
    jobs: int
    messages: int
    #: Where the messages went: a file, or `archive/<name>` in the object store.
    archive: str
    snapshot: str


async def archive_finished_jobs(
    js: JetStreamContext, db_path: Path, older_than_s: float, out: Path | None = None, now_ms: int | None = None
) -> Retained:
    """Archive and purge the jobs of the read models in `db_path` that finished `older_than_s` ago."""
    now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    if (found := await file_versions(db_path)) != MODEL_VERSIONS:
        # Opening it to write would empty it: it is being upgraded, or holds no read models at all.
        raise Conflict(
            f"{db_path} holds read models of versions {found}, not {MODEL_VERSIONS}: run retention on the "
            "file the projections serve, once any upgrade has finished"
        )
    store = await Store.open(db_path)
    try:
        jobs = await store.finished_before(now_ms - int(older_than_s * 1000))
        if not jobs:
            return Retained(0, 0, "", "")
        return await _archive(js, store, jobs, now_ms, out)
    finally:
        await store.close()


async def _archive(js: JetStreamContext, store: Store, jobs: list[Job], now_ms: int, out: Path | None) -> Retained:
    name = "jobs-" + dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    archive = await js.object_store(subjects.ARCHIVE_BUCKET)

    # 1. The messages, in the export format.
    info = await js.stream_info(subjects.JOBS_STREAM)
    wanted = {subjects.job_subject(job.id) for job in jobs}
    header = ExportHeader(
        format=1, created_at_ms=now_ms,
        streams=[StreamHeader(name=subjects.JOBS_STREAM, config=info.config.as_dict(), messages=0,
                              first_seq=info.state.first_seq, last_seq=info.state.last_seq)],
    )

    async def messages() -> AsyncIterator[Message]:
        async for message in read_stream(js, subjects.JOBS_STREAM, info.state.last_seq):
            if message.subject in wanted:
                yield message

    with tempfile.TemporaryDirectory(prefix="retention-") as tmp:
        target = out or Path(tmp) / f"{name}.jsonl.gz"
        written = await write_export(target, header, messages())
        if out is None:
            with open(target, "rb") as file:
                await archive.put(target.name, file)
    where = str(out) if out else f"{subjects.ARCHIVE_BUCKET}/{name}.jsonl.gz"

    # 2. The rows, for every fold that starts from the log.
    snapshot = f"{name}{SNAPSHOT_SUFFIX}"
    await archive.put(snapshot, encode_snapshot(jobs))

    # 3. Out of the log; only then marked archived, so a crash before leaves them for the next run.
    for job in jobs:
        await js.purge_stream(subjects.JOBS_STREAM, subject=subjects.job_subject(job.id))
    await store.put_archived(jobs)
    logger.info("retention: archived %d jobs (%d messages) to %s and purged them from JOBS", len(jobs), written, where)
    return Retained(len(jobs), written, where, f"{subjects.ARCHIVE_BUCKET}/{snapshot}")


async def load_snapshots(js: JetStreamContext, store: Store, until_jobs_seq: int | None = None) -> int:
    """Write the rows of every retention snapshot into `store` (a file about to be folded from the log);
    with `until_jobs_seq`, only jobs that had ended by then (the others' past is in the archive only)."""
    jobs = await archived_jobs(js, until_jobs_seq)
    if jobs:
        await store.put_archived(jobs)
        logger.info("loaded %d archived job rows from the retention snapshots", len(jobs))
    return len(jobs)
