"""Job commands and queries: submit, cancel, a worker's report about a job; get, list, events, wait, stream.

Commands follow load, decide, save: fold the job (or take the feed's recent copy), decide the event with
a pure function of `sdk.jobs`, append it at the job's sequence. Queries go to the projections over
`proj.>`, except what must be exact now (a job's events, a wait): those read the log.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from gateway.backpressure import Backpressure
from gateway.feed import JobFeed
from gateway.history import HistoryQueries
from gateway.results import read_result, store_result
from gateway.webhooks import WebhookSettings, check_url
from sdk import subjects
from sdk.api import (
    Accepted,
    CancelAccepted,
    CancelJob,
    EventRecord,
    GetJob,
    GetResult,
    JobEvents,
    JobPage,
    JobReport,
    JobView,
    ListJobs,
    OwnedGetJob,
    OwnedListJobs,
    ResultStored,
    SubmitJob,
    Submitted,
    UploadResult,
    job_view,
)
from sdk.connection import request
from sdk.errors import BadRequest, InvalidTransition, JobNotFound, StaleAttempt, Timeout, Unavailable
from sdk.events import JobSubmitted, job_event_decoder
from sdk.group_commit import GroupCommit
from sdk.jobs import HELD_BY_WORKER, Job, JobStatus, apply, decide_cancel, decide_reports, fold, visible_to
from sdk.log import decide_and_append, load_job, read_job_events
from sdk.streaming import assemble

logger = logging.getLogger(__name__)

#: How long a query waits for the projections' answer.
PROJECTION_TIMEOUT_S = 6.0
#: The longest a caller may wait for a job to finish in one request.
MAX_WAIT_S = 300.0
#: Chunks waiting for one slow stream reader; beyond this they are dropped (the final text completes it).
MAX_QUEUED_CHUNKS = 1024


def new_id() -> str:
    """Time-ordered, unguessable: 11 hex digits of milliseconds, then 64 random bits."""
    return f"{time.time_ns() // 1_000_000:011x}{secrets.token_hex(8)}"


def require_connected(nc: NatsClient) -> None:
    """Refuse a write before it starts when NATS is unreachable."""
    # nats-py buffers publishes while reconnecting; a write that might land after we answered 503
    # would be an outcome the caller never learns about, so refuse before writing.
    if not nc.is_connected:
        raise Unavailable("NATS is unreachable; nothing was written, retry later")


class JobCommands(HistoryQueries):
    """The gateway's job commands and queries (a part of `gateway.service.Gateway`)."""

    nc: NatsClient
    js: JetStreamContext
    feed: JobFeed
    backpressure: Backpressure
    #: Appends to JOBS, grouped into atomic batches under load.
    log: GroupCommit

    # --- Commands ----------------------------------------------------------------------------------

    async def submit(self, req: SubmitJob, owner: str | None = None) -> Submitted:
        """Append `JobSubmitted`; the same idempotency key (per owner) returns the first job instead.
        Past a queue limit, `QueueFull` (429) and nothing is appended (`gateway.backpressure`)."""
        require_connected(self.nc)
        self.backpressure.admit(owner)
        if req.webhook_url is not None:
            check_url(req.webhook_url, WebhookSettings.from_env().allow_private)
        job_id = new_id()
        event = JobSubmitted(
            job_id=job_id,
            job_type=req.type,
            model=req.model,
            params=req.params,
            region=req.region,
            priority=req.priority,
            max_attempts=req.max_attempts,
            timeout_s=req.timeout_s,
            idempotency_key=req.idempotency_key,
            owner=owner,
            region_policy=req.region_policy,
            max_latency_ms=req.max_latency_ms,
            webhook_url=req.webhook_url,
        )
        msg_id = f"{owner or '-'}:{req.idempotency_key}" if req.idempotency_key else None
        ack = await self.log.append(subjects.job_subject(job_id), event, msg_id=msg_id)
        if ack.duplicate:
            original = await self.js.get_msg(subjects.JOBS_STREAM, seq=ack.seq, direct=True)
            first = job_event_decoder.decode(original.data or b"")
            job = await self._job(first.job_id, owner)
            logger.info("submit with idempotency key %r returned job %s", req.idempotency_key, job.id)
            return Submitted(id=job.id, status=job.status.value, seq=ack.seq, created=False)
        job = apply(None, event, ack.seq)
        self.feed.remember(job)
        self.backpressure.depth.own(event, ack.seq)
        logger.debug("job %s submitted (%s) at seq %s", job_id, req.type, ack.seq)
        return Submitted(id=job_id, status=job.status.value, seq=ack.seq)

    async def cancel(self, req: CancelJob, owner: str | None = None) -> CancelAccepted:
        """Cancel or ask to stop (`sdk.jobs.decide_cancel`); asking twice appends nothing."""
        require_connected(self.nc)
        job, event = await decide_and_append(
            self.js, req.id, lambda job: decide_cancel(job, req, owner), known=self.feed.get(req.id),
            append_event=self.log.append,
        )
        assert job is not None
        self.feed.remember(job)
        if event is not None:
            self.backpressure.depth.own(event, job.seq)
        status = "cancelled" if job.status is JobStatus.CANCELLED else "cancel_requested"
        logger.info("job %s: %s", job.id, status if event else "cancel already requested")
        return CancelAccepted(id=job.id, status=status, seq=job.seq)

    async def report_job(self, worker_id: str, report: JobReport) -> Accepted:
        """Turn a worker's report into its event, if it is about the attempt the worker holds now; an ending
        that carries its start becomes `JobStarted` and the ending, appended together (`decide_reports`).
        The job's waiters here are answered from the append's ack (`JobFeed.remember`), not the feed."""
        try:
            job, _ = await decide_and_append(
                self.js,
                report.job_id,
                lambda job: decide_reports(job, worker_id, report),
                known=self.feed.get(report.job_id),
                append_event=self.log.append,
            )
        except (StaleAttempt, InvalidTransition, JobNotFound) as exc:
            logger.warning("refused %s from %s: %s", type(report).__name__, worker_id, exc)
            raise
        assert job is not None
        self.feed.remember(job)
        return Accepted(seq=job.seq)

    # --- Queries -----------------------------------------------------------------------------------

    async def get(self, req: GetJob, owner: str | None = None) -> JobView:
        if req.at_seq is not None or req.at_time is not None:
            return await self.job_at(req, owner)  # the past is folded from the log (`gateway.history`)
        query = OwnedGetJob(**msgspec.structs.asdict(req), owner=owner)
        return await request(self.nc, subjects.PROJ_JOBS_GET, query, JobView, timeout_s=PROJECTION_TIMEOUT_S)

    async def list(self, req: ListJobs, owner: str | None = None) -> JobPage:
        if req.at_seq is not None or req.at_time is not None:
            return await self.jobs_at(req, owner)
        query = OwnedListJobs(**msgspec.structs.asdict(req), owner=owner)
        return await request(self.nc, subjects.PROJ_JOBS_LIST, query, JobPage, timeout_s=PROJECTION_TIMEOUT_S)

    async def events(self, job_id: str, owner: str | None = None) -> JobEvents:
        records = await read_job_events(self.js, job_id)
        submitted = fold(records[:1])  # the submission says whose job it is
        if submitted is None or not visible_to(submitted, owner):
            raise JobNotFound(f"job {job_id} not found")
        return JobEvents(items=[EventRecord(seq=seq, event=event) for event, seq in records])

    async def wait(self, job_id: str, timeout_s: float, owner: str | None = None) -> JobView:
        """The job once it is terminal, woken by the event that ends it; `Timeout` after `timeout_s`."""
        if not 0 < timeout_s <= MAX_WAIT_S:
            raise BadRequest(f"timeout_s must be in (0, {MAX_WAIT_S:.0f}], got {timeout_s}")
        future = self.feed.waiter(job_id)
        try:
            # After registering, so the ending event cannot slip by; the feed's copy when it has one.
            job = self.feed.recent(job_id)
            if job is None or not visible_to(job, owner):
                job = await self._job(job_id, owner)
            if not job.status.terminal:
                job = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            raise Timeout(f"job {job_id} is not finished after {timeout_s}s") from None
        finally:
            self.feed.forget_waiter(job_id, future)
        return job_view(job)

    async def stream(
        self, job_id: str, owner: str | None = None, timeout_s: float = MAX_WAIT_S
    ) -> AsyncIterator[str | JobView]:
        """A job's text as it is generated, then the finished job (see `sdk.streaming.assemble`).
        Raises `JobNotFound` before anything is streamed."""
        await self._job(job_id, owner)
        # Bounded: a reader slower than its worker loses chunks, never memory; the final text fills the gap.
        chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=MAX_QUEUED_CHUNKS)
        reloaded_at = 0.0
        known: Job | None = None  # the newest state seen, from the feed or a refold

        def newest(job: Job | None) -> Job | None:
            nonlocal known
            if job is not None and (known is None or job.seq > known.seq):
                known = job
            return known

        async def on_chunk(msg: Msg) -> None:
            # Only the worker holding the job may add to its text (the subject names the sender, and
            # NATS lets a worker publish on its own subjects only); anything else is dropped.
            nonlocal reloaded_at
            sender = msg.subject.split(".")[1]
            job = newest(self.feed.get(job_id))
            if (job is None or job.worker_id != sender) and time.monotonic() - reloaded_at > 1.0:
                # The feed may lag an assignment: refold, at most once a second, and keep what it found
                # (chunks in the second after it would be dropped while the feed still lags).
                reloaded_at = time.monotonic()
                job = newest(await load_job(self.js, job_id))
            if job is None or job.worker_id != sender or job.status not in HELD_BY_WORKER:
                logger.warning("dropped a stream chunk for job %s from %s, which does not hold it", job_id, sender)
            elif not chunks.full():
                chunks.put_nowait(msg.data)

        sub = await self.nc.subscribe(subjects.stream_subjects_of_job(job_id), cb=on_chunk)

        async def pieces() -> AsyncIterator[str | JobView]:
            try:
                async for item in assemble(chunks, self.wait(job_id, timeout_s, owner)):
                    yield item
            finally:
                await sub.unsubscribe()

        return pieces()

    async def result(self, req: GetResult, owner: str | None = None) -> tuple[bytes, str]:
        """The bytes and content type of a finished job's stored result `index` (an image)."""
        job = await self._job(req.id, owner)
        if job.status is not JobStatus.COMPLETED:
            raise JobNotFound(f"job {req.id} has no stored result {req.index} (it is {job.status.value})")
        return await read_result(self.js, job, req.index)

    async def store_result(self, worker_id: str, upload: UploadResult) -> ResultStored:
        """A worker's upload of a large result of the attempt it holds (`gateway.results`)."""
        require_connected(self.nc)
        job = self.feed.get(upload.job_id)
        if job is None or job.worker_id != worker_id or job.attempt != upload.attempt:
            job = await load_job(self.js, upload.job_id)  # the feed may lag; the log decides
        return await store_result(self.js, job, worker_id, upload)

    async def _job(self, job_id: str, owner: str | None) -> Job:
        job = await load_job(self.js, job_id)
        if job is None or not visible_to(job, owner):
            raise JobNotFound(f"job {job_id} not found")
        self.feed.remember(job)
        return job
