"""The projections service: folds JOBS, WORKERS and HEARTBEATS into SQLite and answers `proj.>` queries.

Thin by design: consumers put messages into a feed (`projections.feed`), one task writes them in batches through the store,
and the query handlers read the store. Readers that passed `min_seq` wait on a condition that every
committed batch signals (DESIGN, invariant 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from projections.feed import FOLDED_STREAMS, Feed, follow, log_ends
from projections.retention import load_snapshots
from projections.store import MODEL_VERSIONS, Store, WorkerStatus, file_versions
from projections.upgrade import Upgrade
from sdk import subjects
from sdk.api import (
    GetWorker,
    JobPage,
    JobView,
    ListWorkers,
    OwnedGetJob,
    OwnedListJobs,
    WorkerPage,
    WorkerView,
    decode,
    job_view,
)
from sdk.api.projections import GetProjectionsStatus, ProjectionsStatus, ReadModelStatus, StreamPosition
from sdk.connection import connect
from sdk.endpoints import Endpoints
from sdk.errors import BadRequest, JobNotFound, Unavailable, WorkerNotFound
from sdk.jobs import JobStatus, visible_to
from sdk.log import ensure_streams
from sdk.metrics import DEFAULT_METRICS_HOST, Reading, Readings, metrics_endpoint
from sdk.workers import worker_view

logger = logging.getLogger(__name__)

#: How long a read with `min_seq` waits for the projection to catch up before answering `unavailable`.
MIN_SEQ_WAIT_S = 5.0
#: Pause before retrying a batch that SQLite refused (disk full, locked by another process).
WRITE_RETRY_S = 1.0
#: A cursor is the submission sequence to continue below; anything else was not made by us.
_CURSOR = re.compile(r"[1-9][0-9]{0,18}")
_encoder = msgspec.json.Encoder()


class Projections:
    """Keeps the read models in `db_path` up to date and serves queries on them, until `stop()`."""

    def __init__(self, nc: NatsClient, db_path: Path, *, min_seq_wait_s: float = MIN_SEQ_WAIT_S) -> None:
        self._nc = nc
        self._db_path = db_path
        self._min_seq_wait_s = min_seq_wait_s
        #: Answers reads. The same store as `_folding`, except during an upgrade (`projections.upgrade`),
        #: when it is the old file, frozen, and `_folding` the new one.
        self._serving: Store | None = None
        self._folding: Store | None = None
        self._upgrade: Upgrade | None = None
        self._feed = Feed()
        #: Notified after every committed batch; `wait_for` sleeps on it.
        self._applied = asyncio.Condition()
        #: Held while a batch is written, so `stop` never cancels a transaction halfway.
        self._writing = asyncio.Lock()
        self._applier: asyncio.Task[None] | None = None
        self._consumers: list[Subscription] = []
        self._endpoints = Endpoints(nc, queue=subjects.PROJ_QUEUE, name="projections")

    async def start(self) -> None:
        js = self._nc.jetstream()
        found = await file_versions(self._db_path)
        if found is not None and found != MODEL_VERSIONS:
            # Another version: keep answering from it while the new one is folded beside it.
            self._serving = await Store.open_frozen(self._db_path)
            self._upgrade = Upgrade(self._db_path, MODEL_VERSIONS)
            self._folding = await self._upgrade.begin(js)
        else:
            self._serving = self._folding = await Store.open(self._db_path)
        if not self._folding.positions:
            await load_snapshots(js, self._folding)  # folding from the start: retention's rows first
        self._feed = Feed()  # nothing left over from an earlier start
        self._applier = asyncio.create_task(self._apply_forever(), name="projections-applier")
        for stream in FOLDED_STREAMS:
            self._consumers.append(await follow(js, stream, self._folding.positions.get(stream, 0), self._feed))
        routes = {
            subjects.PROJ_JOBS_GET: self._get_job,
            subjects.PROJ_JOBS_LIST: self._list_jobs,
            subjects.PROJ_WORKERS_GET: self._get_worker,
            subjects.PROJ_WORKERS_LIST: self._list_workers,
            subjects.PROJ_STATUS: self._status,
        }
        await self._endpoints.serve(routes)
        logger.info("projections serving %s from %s", ", ".join(routes), self._db_path)

    async def stop(self) -> None:
        """Stop answering, stop reading, let the batch in progress commit, close the database. Idempotent."""
        await self._endpoints.stop()  # reads still waiting for `min_seq` are answered `unavailable`
        for sub in self._consumers:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._consumers.clear()
        if self._applier is not None:
            async with self._writing:
                self._applier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._applier
            self._applier = None
        if self._upgrade is not None:
            await self._upgrade.abandon()  # the next start begins it again
            self._upgrade = None
        if self._serving is not None:
            await self._serving.close()
            self._serving = self._folding = None
            logger.info("projections stopped")

    def applied_seq(self, stream: str) -> int:
        """The last sequence of `stream` committed to the read models that answer reads."""
        return self._serving.positions.get(stream, 0) if self._serving else 0

    async def wait_for(self, stream: str, seq: int, timeout_s: float) -> None:
        """Return once `stream` is applied up to `seq`; raise `Unavailable` after `timeout_s`."""
        if self.applied_seq(stream) >= seq:
            return
        async with self._applied:
            try:
                await asyncio.wait_for(self._applied.wait_for(lambda: self.applied_seq(stream) >= seq), timeout_s)
            except TimeoutError:
                raise Unavailable(
                    f"the read model has applied {stream} up to #{self.applied_seq(stream)}, "
                    f"not #{seq}, after {timeout_s:g}s; try again",
                    {"stream": stream, "applied_seq": self.applied_seq(stream), "min_seq": seq},
                ) from None

    # --- Folding ---

    async def _apply_forever(self) -> None:
        while True:
            batch = await self._feed.take()
            # Dropping a batch would leave a hole behind the next position, so a refused write is retried.
            while True:
                try:
                    async with self._writing:
                        assert self._folding is not None
                        await self._folding.apply_batch(batch)
                    break
                except Exception:
                    logger.exception("could not write %d events; retrying in %gs", len(batch), WRITE_RETRY_S)
                    await asyncio.sleep(WRITE_RETRY_S)
            if self._upgrade is not None:
                await self._check_upgrade(self._upgrade)
            async with self._applied:
                self._applied.notify_all()

    async def _check_upgrade(self, upgrade: Upgrade) -> None:
        """Once the new file has caught up, it takes over and the old one closes. A failed check (NATS
        slow to answer) is tried again after the next batch: it must not stop the fold."""
        try:
            if not await upgrade.caught_up(self._nc.jetstream()):
                return
        except nats.errors.Error as exc:
            logger.warning("could not check the upgrade's progress (%s); checking after the next batch", exc)
            return
        async with self._writing:
            store = await upgrade.take_over()
            old, self._serving, self._folding, self._upgrade = self._serving, store, store, None
        if old is not None:
            await old.close()

    # --- Queries ---

    @property
    def _reads(self) -> Store:
        if self._serving is None:
            raise Unavailable("the read model is not open")
        return self._serving

    async def _status(self, msg: Msg) -> ProjectionsStatus:
        decode(msg.data or b"{}", GetProjectionsStatus)
        serving = self._reads
        ends = await log_ends(self._nc.jetstream())
        return ProjectionsStatus(
            db=str(self._db_path),
            models=[
                ReadModelStatus(name=name, version=version, serving_version=serving.versions.get(name))
                for name, version in MODEL_VERSIONS.items()
            ],
            streams=[
                StreamPosition(stream=stream, position=self.applied_seq(stream), last_seq=end,
                               lag=max(end - self.applied_seq(stream), 0))
                for stream, end in ends.items()
            ],
            upgrade=self._upgrade.progress() if self._upgrade else None,
        )

    async def _read_after(self, min_seq: int | None) -> None:
        """Wait until JOBS is applied up to `min_seq` (read-your-writes). Only a sequence the log has not
        reached yet, which no write returned and nothing will ever satisfy, is refused at once."""
        if not min_seq or self.applied_seq(subjects.JOBS_STREAM) >= min_seq:
            return
        try:
            info = await self._nc.jetstream().stream_info(subjects.JOBS_STREAM)
        except nats.errors.Error as exc:
            raise Unavailable(f"cannot read the end of {subjects.JOBS_STREAM}: {type(exc).__name__}") from None
        last_seq = info.state.last_seq
        if min_seq > last_seq:
            raise BadRequest(
                f"min_seq {min_seq} is beyond the end of {subjects.JOBS_STREAM} (its last sequence is {last_seq})",
                {"min_seq": min_seq, "last_seq": last_seq},
            )
        await self.wait_for(subjects.JOBS_STREAM, min_seq, self._min_seq_wait_s)

    async def _get_job(self, msg: Msg) -> JobView:
        request: OwnedGetJob = decode(msg.data, OwnedGetJob)
        await self._read_after(request.min_seq)
        job = await self._reads.get_job(request.id)
        if job is None or not visible_to(job, request.owner):
            raise JobNotFound(f"job {request.id} not found", {"id": request.id})
        return job_view(job)

    async def _list_jobs(self, msg: Msg) -> JobPage:
        request: OwnedListJobs = decode(msg.data, OwnedListJobs)
        status = _parse_enum(JobStatus, request.status)
        if request.cursor is not None and not _CURSOR.fullmatch(request.cursor):
            raise BadRequest(f"cursor {request.cursor!r} is not one this endpoint returned")
        await self._read_after(request.min_seq)
        # One more than asked tells whether another page follows.
        jobs = await self._reads.list_jobs(
            limit=request.limit + 1,
            status=status,
            job_type=request.type,
            worker_id=request.worker_id,
            owner=request.owner,
            below_seq=int(request.cursor) if request.cursor else None,
        )
        page = jobs[: request.limit]
        more = len(jobs) > request.limit
        return JobPage(items=[job_view(job) for job in page], next_cursor=str(page[-1].submitted_seq) if more else None)

    async def _get_worker(self, msg: Msg) -> WorkerView:
        request: GetWorker = decode(msg.data, GetWorker)
        worker = await self._reads.get_worker(request.id)
        if worker is None:
            raise WorkerNotFound(f"worker {request.id} not found", {"id": request.id})
        return worker_view(worker, await self._reads.jobs_held_by(worker.id))

    async def _list_workers(self, msg: Msg) -> WorkerPage:
        request: ListWorkers = decode(msg.data, ListWorkers)
        status = _parse_enum(WorkerStatus, request.status)
        workers = await self._reads.list_workers(region=request.region, status=status)
        return WorkerPage(items=[worker_view(w, await self._reads.jobs_held_by(w.id)) for w in workers])


def _parse_enum(kind: type[JobStatus] | type[WorkerStatus], value: str | None) -> Any:
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise BadRequest(
            f"status {value!r} is not one of {', '.join(s.value for s in kind)}", {"status": value}
        ) from None


async def serve(
    nats_url: str, db_path: Path, stop: asyncio.Event, *,
    metrics_port: int | None = None, metrics_host: str = DEFAULT_METRICS_HOST,
) -> None:
    """Run the projections against `nats_url` until `stop` is set; this process's own metrics (`sdk.metrics`:
    each stream's applied position) on `metrics_port`."""
    nc = await connect(nats_url, name="projections")
    try:
        await ensure_streams(nc.jetstream())
        projections = Projections(nc, db_path)
        await projections.start()
        applied = Reading(
            "projections_applied_seq", "The last stream sequence applied to the read models", label="stream",
            read=lambda: {stream: projections.applied_seq(stream) for stream in FOLDED_STREAMS},
        )
        try:
            with metrics_endpoint(metrics_port, Readings(applied), host=metrics_host):
                await stop.wait()
        finally:
            await projections.stop()
    finally:
        await nc.close()
