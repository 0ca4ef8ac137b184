"""The gateway's commands and queries, shared by the HTTP API and the NATS endpoints.

Commands follow load, decide, save: fold the job (or take the feed's recent copy), decide the event
with a pure function, append it at the job's sequence. Queries go to the projections over `proj.>`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError, ObjectNotFoundError

from gateway.admin import Admin
from gateway.auth import Credentials, Principal
from gateway.feed import JobFeed
from sdk import subjects
from sdk.api import (
    Accepted,
    CancelAccepted,
    CancelJob,
    EventRecord,
    GetJob,
    GetResult,
    GetWorker,
    HeartbeatAck,
    IssueTokens,
    JobEvents,
    JobPage,
    JobView,
    ListJobs,
    ListWorkers,
    OwnedGetJob,
    OwnedListJobs,
    RefreshTokens,
    Registered,
    RegisterWorker,
    ReportCancelled,
    ReportCompleted,
    ReportDraining,
    ReportFailed,
    ReportModelLoaded,
    ReportModelUnloaded,
    ReportProgress,
    ReportStarted,
    SubmitJob,
    Submitted,
    TokenPair,
    WorkerConfigView,
    WorkerCredentials,
    WorkerPage,
    WorkerReport,
    WorkerView,
    job_view,
)
from sdk.connection import request
from sdk.errors import (
    BadRequest,
    Conflict,
    InvalidTransition,
    JobNotFound,
    StaleAttempt,
    Timeout,
    Unavailable,
    WorkerNotFound,
)
from sdk.events import (
    Heartbeat,
    JobCancelled,
    JobCancelRequested,
    JobCompleted,
    JobEvent,
    JobFailed,
    JobProgress,
    JobStarted,
    JobSubmitted,
    WorkerCredentialsRotated,
    WorkerDeregistered,
    WorkerDraining,
    WorkerLost,
    WorkerModelLoaded,
    WorkerModelUnloaded,
    WorkerRegistered,
    encoder,
    job_event_decoder,
    worker_event_decoder,
)
from sdk.jobs import HELD_BY_WORKER, Job, JobStatus
from sdk.log import append, decide_and_append, load_job, read_job_events
from sdk.signing import AuthReason, forbidden, refused
from sdk.streaming import assemble
from sdk.worker_config import deep_merge, effective_config, parse_partial

logger = logging.getLogger(__name__)

PROJECTION_TIMEOUT_S = 6.0
MAX_WAIT_S = 300.0


def new_id() -> str:
    """Time-ordered, unguessable: 11 hex digits of milliseconds, then 64 random bits."""
    return f"{time.time_ns() // 1_000_000:011x}{secrets.token_hex(8)}"


class Gateway:
    def __init__(self, nc: NatsClient, credentials: Credentials) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.feed = JobFeed(nc)
        self.credentials = credentials
        self.admin = Admin(self.js, credentials)

    async def start(self) -> None:
        self._config_kv = await self.js.key_value(subjects.WORKER_CONFIG_BUCKET)
        await self.feed.start()

    async def stop(self) -> None:
        await self.feed.stop()

    # --- Credentials ------------------------------------------------------------------------------

    async def issue_tokens(self, req: IssueTokens) -> TokenPair:
        return await self.credentials.issue_tokens(req.api_key)

    async def refresh_tokens(self, req: RefreshTokens) -> TokenPair:
        return await self.credentials.refresh(req.refresh_token)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer <access token>` header; `Unauthorized` (with the
        reason) when it is missing, malformed, expired or revoked."""
        return self.credentials.verify_authorization(authorization)

    # --- Jobs: commands ----------------------------------------------------------------------------

    async def submit(self, req: SubmitJob, owner: str | None = None) -> Submitted:
        """Append `JobSubmitted`; the same idempotency key (per owner) returns the first job instead."""
        self._require_nats()
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
        )
        msg_id = f"{owner or '-'}:{req.idempotency_key}" if req.idempotency_key else None
        ack = await append(self.js, subjects.job_subject(job_id), event, msg_id=msg_id)
        if ack.duplicate:
            original = await self.js.get_msg(subjects.JOBS_STREAM, seq=ack.seq, direct=True)
            first = job_event_decoder.decode(original.data or b"")
            job = await self._job(first.job_id, owner)
            logger.info("submit with idempotency key %r returned job %s", req.idempotency_key, job.id)
            return Submitted(id=job.id, status=job.status.value, seq=ack.seq, created=False)
        job = Job(
            id=job_id, type=req.type, model=req.model, params=req.params, region=req.region,
            priority=req.priority, max_attempts=req.max_attempts, timeout_s=req.timeout_s, owner=owner,
            submitted_at_ms=event.at_ms, seq=ack.seq, submitted_seq=ack.seq,
        )
        self.feed.remember(job)
        logger.debug("job %s submitted (%s) at seq %s", job_id, req.type, ack.seq)
        return Submitted(id=job_id, status=job.status.value, seq=ack.seq)

    async def cancel(self, req: CancelJob, owner: str | None = None) -> CancelAccepted:
        """A queued job is cancelled at once; a job a worker holds is asked to stop (the scheduler tells
        the worker); asking twice appends nothing; a finished job is a conflict."""
        self._require_nats()

        def decide(job: Job | None) -> JobEvent | None:
            if job is None or not _visible(job, owner):
                raise JobNotFound(f"job {req.id} not found")
            if job.status is JobStatus.QUEUED:
                return JobCancelled(job_id=job.id, reason=req.reason or "cancelled by request")
            if job.status in HELD_BY_WORKER:
                return None if job.cancel_requested else JobCancelRequested(job_id=job.id, reason=req.reason)
            raise InvalidTransition(f"job {job.id} is already {job.status.value}", {"status": job.status.value})

        job, event = await decide_and_append(self.js, req.id, decide, known=self.feed.get(req.id))
        assert job is not None
        self.feed.remember(job)
        status = "cancelled" if job.status is JobStatus.CANCELLED else "cancel_requested"
        logger.info("job %s: %s", job.id, status if event else "cancel already requested")
        return CancelAccepted(id=job.id, status=status, seq=job.seq)

    # --- Jobs: queries -----------------------------------------------------------------------------

    async def get(self, req: GetJob, owner: str | None = None) -> JobView:
        query = OwnedGetJob(**msgspec.structs.asdict(req), owner=owner)
        return await request(self.nc, subjects.PROJ_JOBS_GET, query, JobView, timeout_s=PROJECTION_TIMEOUT_S)

    async def list(self, req: ListJobs, owner: str | None = None) -> JobPage:
        query = OwnedListJobs(**msgspec.structs.asdict(req), owner=owner)
        return await request(self.nc, subjects.PROJ_JOBS_LIST, query, JobPage, timeout_s=PROJECTION_TIMEOUT_S)

    async def events(self, job_id: str, owner: str | None = None) -> JobEvents:
        records = await read_job_events(self.js, job_id)
        if not records or (owner is not None and getattr(records[0][0], "owner", None) != owner):
            raise JobNotFound(f"job {job_id} not found")
        return JobEvents(items=[EventRecord(seq=seq, event=event) for event, seq in records])

    async def wait(self, job_id: str, timeout_s: float, owner: str | None = None) -> JobView:
        """The job once it is terminal, woken by the event that ends it; `Timeout` after `timeout_s`."""
        if not 0 < timeout_s <= MAX_WAIT_S:
            raise BadRequest(f"timeout_s must be in (0, {MAX_WAIT_S:.0f}], got {timeout_s}")
        future = self.feed.waiter(job_id)
        try:
            job = await self._job(job_id, owner)  # after registering, so the ending event cannot slip by
            if not job.status.terminal:
                job = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            raise Timeout(f"job {job_id} is not finished after {timeout_s}s") from None
        finally:
            self.feed.forget_waiter(job_id, future)
        return job_view(job)

    async def stream(self, job_id: str, owner: str | None = None, timeout_s: float = MAX_WAIT_S) -> AsyncIterator[str | JobView]:
        """A job's text as it is generated, then the finished job (see `sdk.streaming.assemble`).
        Raises `JobNotFound` before anything is streamed."""
        await self._job(job_id, owner)
        chunks: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_chunk(msg: Msg) -> None:
            chunks.put_nowait(msg.data)

        sub = await self.nc.subscribe(subjects.stream_subject(job_id), cb=on_chunk)

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
        refs = job.result.get("images", []) if isinstance(job.result, dict) else []
        if job.status is not JobStatus.COMPLETED or not 0 <= req.index < len(refs):
            raise JobNotFound(f"job {req.id} has no stored result {req.index} ({len(refs)} stored)")
        ref = refs[req.index]
        store = await self.js.object_store(subjects.RESULTS_BUCKET)
        try:
            obj = await store.get(ref["object"])
        except ObjectNotFoundError:
            raise JobNotFound(f"result {req.index} of job {req.id} is no longer stored") from None
        return obj.data or b"", ref.get("content_type", "application/octet-stream")

    async def _job(self, job_id: str, owner: str | None) -> Job:
        job = await load_job(self.js, job_id)
        if job is None or not _visible(job, owner):
            raise JobNotFound(f"job {job_id} not found")
        self.feed.remember(job)
        return job

    # --- Workers -----------------------------------------------------------------------------------

    async def workers(self, req: ListWorkers) -> WorkerPage:
        return await request(self.nc, subjects.PROJ_WORKERS_LIST, req, WorkerPage, timeout_s=PROJECTION_TIMEOUT_S)

    async def worker(self, worker_id: str) -> WorkerView:
        return await request(
            self.nc, subjects.PROJ_WORKERS_GET, GetWorker(id=worker_id), WorkerView, timeout_s=PROJECTION_TIMEOUT_S
        )

    async def register(self, req: RegisterWorker, returning: str | None = None) -> Registered:
        """`WorkerRegistered`. A new worker spends an enrollment token and receives its credentials (once);
        a returning worker has proved who it is (`returning`: the worker id its signature names)."""
        credentials: WorkerCredentials | None = None
        if returning is not None:
            if req.worker_id not in (None, returning):
                raise forbidden(AuthReason.WORKER_MISMATCH, f"worker {returning} cannot register as {req.worker_id}")
            worker_id = returning
        elif req.enrollment_token is not None:
            worker_id = req.worker_id or f"w{secrets.token_hex(6)}"
            credentials = await self.credentials.enroll(req.enrollment_token, worker_id)
        else:
            raise refused(
                AuthReason.MISSING_HEADER,
                "a new worker registers with an enrollment token (`gpuctl workers enroll`); "
                "a returning worker signs its registration",
            )
        event = WorkerRegistered(
            worker_id=worker_id, name=req.name, region=req.region,
            capabilities=tuple(req.capabilities), gpus=tuple(req.gpus),
        )
        ack = await append(self.js, subjects.worker_subject(worker_id), event)
        how = "enrolled" if credentials is not None else "returning"
        logger.info("worker %s (%s) registered in region %s (%s)", worker_id, req.name, req.region, how)
        return Registered(worker_id=worker_id, region=req.region, seq=ack.seq, credentials=credentials)

    async def heartbeat(self, worker_id: str, beat: Heartbeat) -> HeartbeatAck:
        """Store the latest telemetry; a worker the platform lost (or never knew) must register again."""
        if beat.worker_id != worker_id:
            raise BadRequest(f"heartbeat for {beat.worker_id} sent on the subject of {worker_id}")
        last = await self._last_worker_event(worker_id)
        if last is None or isinstance(last, (WorkerLost, WorkerDeregistered)):
            return HeartbeatAck(registered=False)
        await self.js.publish(subjects.heartbeat_subject(beat.region, worker_id), encoder.encode(beat))
        return HeartbeatAck(registered=True, rotate=await self.credentials.rotation_due(worker_id))

    async def rotate(self, worker_id: str) -> WorkerCredentials:
        """The worker's next credential generation, in the reply only; the log records the generation."""
        credentials = await self.credentials.rotate_worker(worker_id)
        event = WorkerCredentialsRotated(worker_id=worker_id, generation=credentials.generation)
        await append(self.js, subjects.worker_subject(worker_id), event)
        logger.info("worker %s rotated its credentials to generation %d", worker_id, credentials.generation)
        return credentials

    async def _last_worker_event(self, worker_id: str) -> Any:
        try:
            msg = await self.js.get_msg(
                subjects.WORKERS_STREAM, subject=subjects.worker_subject(worker_id), direct=True
            )
        except NotFoundError:
            return None
        return worker_event_decoder.decode(msg.data or b"")

    async def report(self, worker_id: str, report: WorkerReport) -> Accepted:
        """Turn a worker's report into an event, if it is about the attempt the worker holds now."""
        self._require_nats()
        match report:
            case ReportModelLoaded():
                event: Any = WorkerModelLoaded(worker_id=worker_id, model=report.model, memory_bytes=report.memory_bytes)
            case ReportModelUnloaded():
                event = WorkerModelUnloaded(worker_id=worker_id, model=report.model)
            case ReportDraining():
                event = WorkerDraining(worker_id=worker_id)
            case _:
                return await self._job_report(worker_id, report)
        ack = await append(self.js, subjects.worker_subject(worker_id), event)
        return Accepted(seq=ack.seq)

    async def _job_report(self, worker_id: str, report: Any) -> Accepted:
        def decide(job: Job | None) -> JobEvent:
            if job is None:
                raise JobNotFound(f"job {report.job_id} not found")
            if job.worker_id != worker_id or job.attempt != report.attempt:
                raise StaleAttempt(
                    f"job {job.id} is at attempt {job.attempt} on {job.worker_id}; "
                    f"{worker_id} reported attempt {report.attempt}",
                    {"attempt": job.attempt},
                )
            common = {"job_id": job.id, "worker_id": worker_id, "attempt": report.attempt}
            match report:
                case ReportStarted():
                    return JobStarted(**common)
                case ReportProgress():
                    return JobProgress(**common, progress=report.progress, message=report.message)
                case ReportCompleted():
                    return JobCompleted(**common, result=report.result)
                case ReportFailed():
                    return JobFailed(**common, error=report.error)
                case ReportCancelled():
                    if not job.cancel_requested:
                        raise InvalidTransition(f"job {job.id} was not asked to cancel")
                    return JobCancelled(job_id=job.id, reason="stopped by its worker")
            raise BadRequest(f"unknown report {type(report).__name__}")

        try:
            job, _ = await decide_and_append(self.js, report.job_id, decide, known=self.feed.get(report.job_id))
        except (StaleAttempt, InvalidTransition, JobNotFound) as exc:
            logger.warning("refused %s from %s: %s", type(report).__name__, worker_id, exc)
            raise
        assert job is not None
        self.feed.remember(job)
        return Accepted(seq=job.seq)

    # --- Worker runtime configuration --------------------------------------------------------------

    async def get_config(self, worker_id: str) -> WorkerConfigView:
        if await self._last_worker_event(worker_id) is None:
            raise WorkerNotFound(f"worker {worker_id} not found")
        defaults, _ = await self._kv_get(subjects.WORKER_CONFIG_DEFAULTS_KEY)
        overrides, revision = await self._kv_get(worker_id)
        return WorkerConfigView(
            worker_id=worker_id, effective=effective_config(defaults, overrides), overrides=overrides, revision=revision
        )

    async def set_config(self, worker_id: str, changes: dict[str, Any]) -> WorkerConfigView:
        """Merge `changes` into the worker's overrides; refused whole (nothing written) if any value is bad."""
        if await self._last_worker_event(worker_id) is None:
            raise WorkerNotFound(f"worker {worker_id} not found")
        for _ in range(5):
            defaults, _ = await self._kv_get(subjects.WORKER_CONFIG_DEFAULTS_KEY)
            overrides, revision = await self._kv_get(worker_id)
            merged = deep_merge(overrides, changes)
            effective = effective_config(defaults, merged)  # raises BadRequest naming the key
            try:
                if revision:
                    revision = await self._config_kv.update(worker_id, encoder.encode(merged), last=revision)
                else:
                    revision = await self._config_kv.create(worker_id, encoder.encode(merged))
            except KeyWrongLastSequenceError:
                continue
            logger.info("worker %s config changed: %s", worker_id, sorted(changes))
            return WorkerConfigView(worker_id=worker_id, effective=effective, overrides=merged, revision=revision)
        raise Conflict(f"config of worker {worker_id} kept changing")

    async def get_defaults(self) -> dict[str, Any]:
        defaults, _ = await self._kv_get(subjects.WORKER_CONFIG_DEFAULTS_KEY)
        return msgspec.to_builtins(effective_config(defaults, None))

    async def set_defaults(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge `changes` into the platform-wide defaults every worker inherits."""
        defaults, revision = await self._kv_get(subjects.WORKER_CONFIG_DEFAULTS_KEY)
        merged = deep_merge(defaults, changes)
        effective = effective_config(merged, None)  # raises BadRequest naming the key
        await self._config_kv.put(subjects.WORKER_CONFIG_DEFAULTS_KEY, encoder.encode(merged))
        logger.info("worker config defaults changed: %s", sorted(changes))
        return msgspec.to_builtins(effective)

    async def _kv_get(self, key: str) -> tuple[dict[str, Any], int]:
        try:
            entry = await self._config_kv.get(key)
        except KeyNotFoundError:
            return {}, 0
        return parse_partial(entry.value), entry.revision or 0

    def _require_nats(self) -> None:
        # nats-py buffers publishes while reconnecting; a write that might land after we answered 503
        # would be an outcome the caller never learns about, so refuse before writing.
        if not self.nc.is_connected:
            raise Unavailable("NATS is unreachable; nothing was written, retry later")

    # --- Health ------------------------------------------------------------------------------------

    async def health(self) -> dict[str, str]:
        """Each dependency's state; NATS must answer a round trip within a second."""
        state = {"nats": "down", "jetstream": "down"}
        if self.nc.is_connected:
            try:
                await self.nc.flush(timeout=1)
                state["nats"] = "ok"
                await self.js.account_info()
                state["jetstream"] = "ok"
            except Exception as exc:  # any failure here is the answer, not an error
                logger.debug("health check: %s", exc)
        return state


def _visible(job: Job, owner: str | None) -> bool:
    """An operator (owner None) sees every job; a client only its own."""
    return owner is None or job.owner == owner
