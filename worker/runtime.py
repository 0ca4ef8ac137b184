"""The worker runtime: a dumb terminal that runs what the platform dispatches to it.

`Worker` registers (and comes back as the same worker after a restart), follows its runtime config in
the `worker-config` KV bucket, heartbeats, and consumes `dispatch.<region>.<worker_id>` through its own
durable push consumer. Each assignment is reported started, run by the engine of its job type (with a
timeout and a cancel), reported completed, failed or cancelled, and only then acked. Every request to
the platform goes through `Worker._send`, which signs it (`sdk.signing`) with the worker's HMAC secret.

Credentials: the first registration spends an enrollment token and returns the worker's id, tokens and
secret, kept in `credentials_path` (mode 0600); later registrations are signed instead. When a
heartbeat's answer says `rotate`, the worker asks for its next generation and switches to it.

Decisions about a job (may it run here? what does an engine's ending mean?) are pure functions at the
bottom of this module; the class only does the I/O around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, get_args

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from nats.js.object_store import ObjectStore

from sdk import subjects
from sdk.api import (
    MAX_BODY_BYTES,
    Accepted,
    HeartbeatAck,
    JobType,
    ModelSettings,
    Registered,
    RegisterWorker,
    ReportCancelled,
    ReportCompleted,
    ReportDraining,
    ReportFailed,
    ReportProgress,
    ReportStarted,
    RotateCredentials,
    StreamChunk,
    Token,
    WorkerConfig,
    WorkerCredentials,
    WorkerReport,
)
from sdk.connection import connect, request
from sdk.errors import (
    BadRequest,
    InvalidTransition,
    JobNotFound,
    PlatformError,
    StaleAttempt,
    Timeout,
    Unauthorized,
    Unavailable,
    WorkerNotFound,
)
from sdk.events import Assignment, CancelOrder, ErrorInfo, GpuInfo, Heartbeat, dispatch_decoder, encoder
from sdk.private_files import write_private
from sdk.signing import sign
from sdk.worker_config import effective_config, parse_partial
from worker.engines.base import BaseEngine, EngineError, JobContext, ModelSpec

if TYPE_CHECKING:
    from worker.config import LocalConfig

logger = logging.getLogger(__name__)

#: How long one request to the gateway may take before it counts as unanswered.
REQUEST_TIMEOUT_S = 5.0
#: How long registration and job reports keep retrying an unanswered gateway (it may be restarting).
REQUEST_RETRY_S = 60.0
RETRY_MAX_DELAY_S = 5.0
#: Progress reports are coalesced to at most one per interval per job (each one is an event in the log).
PROGRESS_INTERVAL_S = 0.5
#: JetStream redelivers an unacked dispatch after this; a held job renews it every third of it.
DISPATCH_ACK_WAIT_S = 60.0
#: After a cancel or a timeout, how long an engine may take to wind down before it is cut off.
CANCEL_GRACE_S = 5.0
#: Error messages are cut to this length, so a failure report always fits in a request.
MAX_ERROR_MESSAGE_CHARS = 4000
#: The worker's identity between runs, in its state dir.
STATE_FILE = "worker.json"
#: Its credentials (id, tokens, HMAC secret), in its state dir unless `credentials_path` says otherwise.
CREDENTIALS_FILE = "credentials.json"

#: The platform's answers that mean "this attempt is not yours (any more)": never retried.
NOT_YOURS = (StaleAttempt, InvalidTransition, JobNotFound)

R = TypeVar("R")


# --- What other components plug in ---------------------------------------------------------------


class ModelProvider(Protocol):
    """Hands out loaded models for the length of a job; `worker.models.ModelCache` implements it."""

    def use(self, engine: BaseEngine, spec: ModelSpec) -> contextlib.AbstractAsyncContextManager[Any]: ...


class HostTelemetry(msgspec.Struct, frozen=True, kw_only=True):
    """What the telemetry hook returns: the GPUs this worker uses, and the memory free for models."""

    gpus: tuple[GpuInfo, ...] = ()
    memory_free_bytes: int | None = None


class WorkerState(msgspec.Struct, kw_only=True):
    """What survives a restart (in `<state_dir>/worker.json`)."""

    worker_id: str


# --- The worker ------------------------------------------------------------------------------------


class Worker:
    """One GPU node. `await start()`, later `await stop()`; or `async with Worker(...) as worker:`."""

    def __init__(
        self,
        nats_url: str | None = None,
        *,
        name: str,
        region: str,
        engines: Mapping[str, BaseEngine],
        state_dir: Path,
        models: ModelProvider | None = None,
        telemetry: Callable[[], HostTelemetry] | None = None,
        loaded_models: Callable[[], Iterable[str]] | None = None,
        tls: ssl.SSLContext | None = None,
        enrollment_token: str | None = None,
        credentials_path: Path | None = None,
        drain_timeout_s: float = 30.0,
        request_retry_s: float = REQUEST_RETRY_S,
        connect_wait_s: float = 30.0,
    ) -> None:
        """`models` lends loaded models to engines that need them; `telemetry` is called (in a thread)
        at registration and for each heartbeat; `loaded_models` names the models in memory, for
        heartbeats. Bad arguments fail here, naming the valid choices."""
        self._nats_url = nats_url
        self._name = _token("name", name)
        self._region = _token("region", region)
        self._engines = _check_engines(engines, models)
        self._state_dir = Path(state_dir)
        self._models = models
        self._telemetry = telemetry
        self._loaded_models = loaded_models
        self._tls = tls
        self._enrollment_token = enrollment_token
        self._credentials_path = credentials_path or self._state_dir / CREDENTIALS_FILE
        self._credentials: WorkerCredentials | None = None
        self._drain_timeout_s = drain_timeout_s
        self._request_retry_s = request_retry_s
        self._connect_wait_s = connect_wait_s

        self._config = WorkerConfig()
        #: The partial configs as last read: `_defaults` and this worker's own key.
        self._partials: dict[str, dict[str, Any]] = {}
        self._slots = _Slots(self._config.max_concurrency)
        self._jobs: dict[tuple[str, int], _HeldJob] = {}
        self._jobs_done = 0
        self._worker_id: str | None = None
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._results: ObjectStore | None = None
        self._dispatch_sub: JetStreamContext.PushSubscription | None = None
        self._watchers: list[KeyValue.KeyWatcher] = []
        self._background: list[asyncio.Task[None]] = []
        self._beat_now = asyncio.Event()
        self._abandon = asyncio.Event()
        self._stopping = False
        self._stop_task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(
        cls,
        config: LocalConfig,
        engines: Mapping[str, BaseEngine],
        *,
        models: ModelProvider | None = None,
        telemetry: Callable[[], HostTelemetry] | None = None,
        loaded_models: Callable[[], Iterable[str]] | None = None,
    ) -> Worker:
        return cls(
            config.nats_url,
            name=config.name,
            region=config.region,
            engines=engines,
            state_dir=config.state_dir,
            models=models,
            telemetry=telemetry,
            loaded_models=loaded_models,
            tls=config.tls.ssl_context(),
            enrollment_token=config.enrollment_token,
            credentials_path=config.credentials_file,
            drain_timeout_s=config.drain_timeout_s,
        )

    # --- What tests and operators look at ----------------------------------------------------------

    @property
    def worker_id(self) -> str | None:
        """The id the platform knows this worker by (None until registered)."""
        return self._worker_id

    @property
    def credentials_generation(self) -> int | None:
        """The generation of the credentials this worker signs with (None before its enrollment)."""
        return self._credentials.generation if self._credentials is not None else None

    @property
    def region(self) -> str:
        return self._region

    @property
    def config(self) -> WorkerConfig:
        """The runtime config in effect (platform defaults merged with this worker's overrides)."""
        return self._config

    @property
    def jobs_done(self) -> int:
        """Jobs this worker finished and reported (completed, failed or cancelled) since it started."""
        return self._jobs_done

    @property
    def in_flight(self) -> tuple[str, ...]:
        """Ids of the jobs this worker holds: running, or waiting for a free slot."""
        return tuple(dict.fromkeys(job_id for job_id, _ in self._jobs))

    # --- Lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, register, read the runtime config, start heartbeats, then take dispatches."""
        if self._nc is not None:
            raise RuntimeError("this worker was started already")
        try:
            self._nc = await connect(
                self._nats_url, name=f"gpu-worker-{self._name}", tls=self._tls, wait_s=self._connect_wait_s
            )
            self._js = self._nc.jetstream()
            await self._register(retry_for_s=self._request_retry_s)
            await self._follow_config()
            self._background.append(asyncio.create_task(self._heartbeat_loop()))
            await self._take_dispatches()
        except BaseException:
            await self.stop(drain=False)
            raise
        logger.info(
            "worker %s (%s) ready in region %s: engines %s, max_concurrency %d",
            self._worker_id, self._name, self._region, sorted(self._engines), self._config.max_concurrency,
        )

    async def stop(self, drain: bool = True) -> None:
        """Stop; idempotent. With `drain`, running jobs may finish (up to `drain_timeout_s`); without it,
        or when the bound passes, they are abandoned unacked and the platform requeues them. A call with
        `drain=False` during a draining stop cuts the drain short."""
        if not drain:
            self._abandon.set()
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._shutdown(drain))
        await asyncio.shield(self._stop_task)

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop(drain=exc_type is None)

    async def _shutdown(self, drain: bool) -> None:
        # 1. Take no new dispatches. Jobs still waiting for a slot go back (nak): they are redelivered
        #    as soon as this worker returns (or requeued by the platform if it does not).
        self._stopping = True
        if self._dispatch_sub is not None:
            with contextlib.suppress(Exception):
                await self._dispatch_sub.unsubscribe()
        for held in list(self._jobs.values()):
            if not held.running:
                held.task.cancel()
                with contextlib.suppress(Exception):
                    await held.msg.nak()
        # 2. Tell the platform to send nothing more; heartbeats say `draining` from now on.
        if drain and self._worker_id is not None and self._nc is not None and self._nc.is_connected:
            try:
                await self._send(subjects.report_subject(self._worker_id), ReportDraining(), Accepted)
            except PlatformError as exc:
                logger.warning("could not report draining: %s", exc)
            self._beat_now.set()
        # 3. Let running jobs finish, within the bound (heartbeats continue meanwhile, or the platform
        #    would think this worker lost and requeue the very jobs it is finishing).
        await self._drain(self._drain_timeout_s if drain else 0.0)
        # 4. Stop the heartbeats and the config watches.
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for watcher in self._watchers:
            with contextlib.suppress(Exception):
                await watcher.stop()
        # 5. Close the connection, flushing the last acks first.
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            await self._nc.close()
        logger.info("worker %s stopped after %d jobs", self._worker_id or self._name, self._jobs_done)

    async def _drain(self, timeout_s: float) -> None:
        pending = {held.task for held in self._jobs.values()}
        if pending and timeout_s > 0:
            logger.info("waiting up to %.0fs for %d jobs to finish", timeout_s, len(pending))
            abandon = asyncio.create_task(self._abandon.wait())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while pending and not abandon.done() and (remaining_s := deadline - loop.time()) > 0:
                _, pending = await asyncio.wait(
                    pending | {abandon}, timeout=remaining_s, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(abandon)
            abandon.cancel()
        left = [held for held in self._jobs.values() if not held.task.done()]
        if left:
            logger.warning(
                "abandoning %d jobs (%s); the platform will requeue them",
                len(left), ", ".join(f"{h.assignment.job_id}#{h.assignment.attempt}" for h in left),
            )
        for held in left:
            held.task.cancel()
        await asyncio.gather(*(held.task for held in left), return_exceptions=True)

    # --- Requests to the platform ------------------------------------------------------------------

    async def _send(
        self, subject: str, payload: msgspec.Struct, reply_type: type[R], *, retry_for_s: float = 0.0
    ) -> R:
        """The one way this worker asks the platform anything; signed once it has credentials (a new
        signature, with a new nonce, per attempt). Retries an unanswered request (Timeout, Unavailable)
        with backoff for up to `retry_for_s`; a refusal (any other error reply) is raised at once as its
        typed error."""
        assert self._nc is not None
        body = encoder.encode(payload)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_for_s
        delay_s = 0.1
        while True:
            headers = None
            if self._credentials is not None:
                secret = bytes.fromhex(self._credentials.hmac_secret_hex)
                headers = sign(secret, subject, body, worker_id=self._credentials.worker_id)
            try:
                reply: R = await request(
                    self._nc, subject, body, reply_type, timeout_s=REQUEST_TIMEOUT_S, headers=headers
                )
                return reply
            except (Timeout, Unavailable) as exc:
                remaining_s = deadline - loop.time()
                if remaining_s <= 0:
                    raise
                logger.warning("%s: %s; retrying in %.1fs", subject, exc.message, min(delay_s, remaining_s))
                await asyncio.sleep(min(delay_s, remaining_s))
                delay_s = min(delay_s * 2, RETRY_MAX_DELAY_S)

    async def report(self, report: WorkerReport) -> Accepted:
        """Send a report about a job or this worker (retried while the gateway does not answer)."""
        assert self._worker_id is not None
        return await self._send(
            subjects.report_subject(self._worker_id), report, Accepted, retry_for_s=self._request_retry_s
        )

    async def _register(self, *, retry_for_s: float) -> None:
        if self._credentials is None:
            self._credentials = self._read_credentials()
        previous = self._worker_id or (self._credentials.worker_id if self._credentials else self._read_state())
        sample = await self._sample_telemetry()

        async def register() -> Registered:
            req = RegisterWorker(
                name=self._name,
                region=self._region,
                capabilities=sorted(self._engines),  # type: ignore[arg-type]  # checked against JobType
                gpus=list(sample.gpus) if sample else [],
                worker_id=previous,
                # A worker with credentials signs instead; the token is for its first registration only.
                enrollment_token=self._enrollment_token if self._credentials is None else None,
            )
            return await self._send(subjects.API_WORKERS_REGISTER, req, Registered, retry_for_s=retry_for_s)

        try:
            registered = await register()
        except Unauthorized as exc:
            if self._credentials is None or self._enrollment_token is None:
                raise
            # Revoked, or credentials of another installation: a new token given to it enrolls it again.
            logger.warning("this worker's credentials were refused (%s); enrolling with the token", exc.message)
            self._credentials = None
            registered = await register()
        if self._worker_id is not None and (registered.worker_id, registered.region) != (self._worker_id, self._region):
            # The dispatch consumer is bound to the old identity; only a restart can move it.
            logger.error(
                "re-registration answered %s in %s, not %s in %s; restart this worker",
                registered.worker_id, registered.region, self._worker_id, self._region,
            )
            return
        self._worker_id, self._region = registered.worker_id, registered.region
        save_identity(self._state_dir, registered.worker_id)
        if registered.credentials is not None:
            self._store_credentials(registered.credentials)
        returning = " (returning)" if previous == registered.worker_id else ""
        logger.info(
            "registered as %s (%s) in region %s%s", registered.worker_id, self._name, registered.region, returning
        )

    async def _rotate(self) -> None:
        """Ask for the next credential generation and switch to it (the previous one verifies for a
        minute more, so requests signed meanwhile still land)."""
        assert self._worker_id is not None
        credentials = await self._send(subjects.rotate_subject(self._worker_id), RotateCredentials(), WorkerCredentials)
        self._store_credentials(credentials)
        logger.info("rotated this worker's credentials to generation %d", credentials.generation)

    def _store_credentials(self, credentials: WorkerCredentials) -> None:
        save_credentials(self._credentials_path, credentials)
        self._credentials = credentials
        logger.info(
            "stored this worker's credentials (generation %d) in %s", credentials.generation, self._credentials_path
        )

    def _read_credentials(self) -> WorkerCredentials | None:
        try:
            return msgspec.json.decode(self._credentials_path.read_bytes(), type=WorkerCredentials)
        except FileNotFoundError:
            return None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("ignoring unreadable credentials %s (enrolling again): %s", self._credentials_path, exc)
            return None

    def _read_state(self) -> str | None:
        path = self._state_dir / STATE_FILE
        try:
            return msgspec.json.decode(path.read_bytes(), type=WorkerState).worker_id
        except FileNotFoundError:
            return None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("ignoring unreadable %s (registering as a new worker): %s", path, exc)
            return None

    async def _sample_telemetry(self) -> HostTelemetry | None:
        if self._telemetry is None:
            return None
        try:
            return await asyncio.to_thread(self._telemetry)  # NVML calls block
        except Exception:
            logger.exception("telemetry failed; reporting without it")
            return None

    # --- Runtime config ------------------------------------------------------------------------------

    async def _follow_config(self) -> None:
        """Read `_defaults` and this worker's key, then keep watching both: changes apply at once."""
        assert self._js is not None and self._worker_id is not None
        kv = await self._js.key_value(subjects.WORKER_CONFIG_BUCKET)
        for key in (subjects.WORKER_CONFIG_DEFAULTS_KEY, self._worker_id):
            watcher = await kv.watch(key)
            self._watchers.append(watcher)
            # The watch first delivers the current value (if any), then None.
            while (entry := await watcher.updates(timeout=REQUEST_TIMEOUT_S)) is not None:
                self._on_config_entry(key, entry)
            self._background.append(asyncio.create_task(self._watch_config(key, watcher)))
        logger.info("runtime config: %s", msgspec.to_builtins(self._config))

    async def _watch_config(self, key: str, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None:
                self._on_config_entry(key, entry)

    def _on_config_entry(self, key: str, entry: KeyValue.Entry) -> None:
        deleted = entry.operation in (KV_DEL, KV_PURGE)
        try:
            partial_config = {} if deleted else parse_partial(entry.value)
            if not isinstance(partial_config, dict):
                raise BadRequest(f"expected a JSON object, got {type(partial_config).__name__}")
            partials = {**self._partials, key: partial_config}
            config = effective_config(
                partials.get(subjects.WORKER_CONFIG_DEFAULTS_KEY), partials.get(self._worker_id or "")
            )
        except (msgspec.DecodeError, BadRequest) as exc:
            logger.warning("ignoring invalid worker config %r (keeping the current one): %s", key, exc)
            return
        self._partials = partials
        changes = config_changes(self._config, config)
        if not changes:
            return
        self._config = config
        for change in changes:
            logger.info("worker config changed: %s", change)
        self._slots.resize(config.max_concurrency)
        self._beat_now.set()  # the platform sees the new capacity (and interval) at once

    # --- Heartbeats ------------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """One heartbeat now, then one per `heartbeat_interval_s`, and one at once when woken."""
        while True:
            self._beat_now.clear()
            try:
                await self._beat()
            except Exception:
                logger.exception("heartbeat failed")
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that meets a wake-up.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.heartbeat_interval_s):
                    await self._beat_now.wait()

    async def _beat(self) -> None:
        assert self._worker_id is not None
        sample = await self._sample_telemetry()
        beat = Heartbeat(
            worker_id=self._worker_id,
            region=self._region,
            interval_s=self._config.heartbeat_interval_s,
            max_concurrency=self._config.max_concurrency,
            in_flight=self.in_flight,
            loaded_models=tuple(self._loaded_models()) if self._loaded_models else (),
            gpus=tuple(sample.gpus) if sample else (),
            memory_free_bytes=sample.memory_free_bytes if sample else None,
            jobs_done=self._jobs_done,
            draining=self._stopping,
        )
        try:
            ack = await self._send(subjects.heartbeat_request_subject(self._worker_id), beat, HeartbeatAck)
        except WorkerNotFound:
            ack = HeartbeatAck(registered=False)
        except Unauthorized as exc:
            logger.error("heartbeat refused: %s; this worker needs a new enrollment if it was revoked", exc.message)
            return
        except PlatformError as exc:
            logger.warning("heartbeat not accepted: %s", exc.message)
            return
        if ack.rotate and ack.registered and not self._stopping:
            try:
                await self._rotate()
            except PlatformError as exc:
                logger.warning("credential rotation failed (the next heartbeat retries): %s", exc.message)
        if not ack.registered and not self._stopping:
            logger.warning("the platform no longer knows worker %s as online; registering again", self._worker_id)
            try:
                await self._register(retry_for_s=0.0)
            except PlatformError as exc:
                logger.warning("registering again failed (next heartbeat retries): %s", exc.message)

    # --- Dispatches --------------------------------------------------------------------------------------

    async def _take_dispatches(self) -> None:
        assert self._js is not None and self._worker_id is not None
        self._dispatch_sub = await self._js.subscribe(
            subjects.dispatch_subject(self._region, self._worker_id),
            durable=subjects.dispatch_consumer(self._worker_id),
            stream=subjects.DISPATCH_STREAM,
            cb=self._on_dispatch,
            manual_ack=True,
            config=js_api.ConsumerConfig(
                ack_policy=js_api.AckPolicy.EXPLICIT, ack_wait=DISPATCH_ACK_WAIT_S, max_deliver=-1
            ),
        )

    async def _on_dispatch(self, msg: Msg) -> None:
        # Callbacks of one subscription run one at a time: hand each job to its own task at once.
        try:
            dispatch = dispatch_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.error("dropping an unreadable dispatch: %s", exc)
            await msg.term()
            return
        match dispatch:
            case CancelOrder():
                self._cancel(dispatch)
                await msg.ack()
            case Assignment():
                self._hold(dispatch, msg)

    def _cancel(self, order: CancelOrder) -> None:
        held = self._jobs.get((order.job_id, order.attempt))
        if held is None:
            logger.info("cancel for job %s attempt %d, which is not running here", order.job_id, order.attempt)
            return
        logger.info("cancelling job %s attempt %d", order.job_id, order.attempt)
        held.cancel_requested = True
        held.ctx.cancelled.set()

    def _hold(self, assignment: Assignment, msg: Msg) -> None:
        key = (assignment.job_id, assignment.attempt)
        if key in self._jobs:
            # A redelivery of a job that is running here (its ack deadline slipped): the first copy acks.
            logger.info("job %s attempt %d is already here; ignoring its redelivery", *key)
            return
        if self._stopping:
            return  # left unacked: redelivered when this worker is back
        held = _HeldJob(assignment, msg)
        progress = _Progress(partial(self._send_progress, held))
        held.progress = progress
        held.ctx = JobContext(
            assignment.job_id,
            assignment.attempt,
            assignment.params,
            emit=partial(self._emit, held),
            progress=progress.offer,
            store_object=partial(self._store_object, assignment.job_id),
        )
        self._jobs[key] = held
        held.task = asyncio.create_task(self._run(held))

    async def _run(self, held: _HeldJob) -> None:
        a = held.assignment
        keep_alive = asyncio.create_task(_keep_alive(held.msg))
        try:
            await self._slots.acquire()
            try:
                held.running = True
                await self._execute(held)
            finally:
                self._slots.release()
        except asyncio.CancelledError:
            logger.info("job %s attempt %d left unfinished (worker stopping)", a.job_id, a.attempt)
            raise
        except Exception:
            # A bug here must not take the worker down; the dispatch stays unacked and comes back.
            logger.exception("job %s attempt %d: runtime error", a.job_id, a.attempt)
        finally:
            keep_alive.cancel()
            held.progress.close()
            del self._jobs[(a.job_id, a.attempt)]

    async def _execute(self, held: _HeldJob) -> None:
        a = held.assignment
        if held.ctx.cancelled.is_set():  # cancelled while it waited for a slot
            await self._finish(held, ReportCancelled(job_id=a.job_id, attempt=a.attempt))
            return
        refusal = preflight(a, self._engines, self._config)
        if refusal is not None:
            logger.warning("job %s attempt %d refused: %s", a.job_id, a.attempt, refusal.message)
            await self._finish(held, ReportFailed(job_id=a.job_id, attempt=a.attempt, error=refusal))
            return
        try:
            await self.report(ReportStarted(job_id=a.job_id, attempt=a.attempt))
        except NOT_YOURS as exc:
            logger.info("dropping dispatch of job %s attempt %d: %s", a.job_id, a.attempt, exc.message)
            await held.msg.ack()
            return
        except (Timeout, Unavailable) as exc:
            logger.error("could not report job %s started (%s); it will be redelivered", a.job_id, exc.message)
            return
        except PlatformError as exc:
            logger.error("job %s attempt %d: start refused (%s); dropping it", a.job_id, a.attempt, exc.message)
            await held.msg.ack()
            return
        logger.info("job %s attempt %d started (%s)", a.job_id, a.attempt, a.job_type)
        await self._finish(held, await self._outcome(held))

    async def _outcome(self, held: _HeldJob) -> WorkerReport:
        """Run the engine and turn how it ended into the report to send."""
        a = held.assignment
        engine = self._engines[a.job_type]
        try:
            async with contextlib.AsyncExitStack() as model_lease:
                model = None
                if engine.needs_model:
                    # Held until the job ends, so the cache never evicts a model in use. The timeout bounds
                    # the job's own work; loading is the cache's, and only a cancel interrupts it.
                    assert self._models is not None and a.model is not None  # construction and preflight
                    spec = ModelSpec(name=a.model, settings=self._config.models.get(a.model, ModelSettings()))
                    lease = model_lease.enter_async_context(self._models.use(engine, spec))
                    model = await _interruptible(lease, held.ctx, timeout_s=None)
                result = await _interruptible(engine.inference(model, held.ctx), held.ctx, timeout_s=a.timeout_s)
        except Exception as exc:
            if not isinstance(exc, (EngineError, PlatformError, _Interrupted)):
                logger.exception("job %s attempt %d: engine error", a.job_id, a.attempt)
            return outcome_report(a, cancel_requested=held.cancel_requested, error=exc)
        return outcome_report(a, cancel_requested=held.cancel_requested, result=result)

    async def _finish(self, held: _HeldJob, report: WorkerReport) -> None:
        """Report how the job ended, then ack its dispatch (also when the report is refused or lost:
        the platform requeues a job whose outcome it never heard)."""
        a = held.assignment
        held.progress.close()  # no progress report may land after the ending
        try:
            await self.report(report)
            logger.info("job %s attempt %d %s", a.job_id, a.attempt, report.__struct_config__.tag)
        except NOT_YOURS as exc:
            logger.warning("job %s attempt %d: %s refused: %s", a.job_id, a.attempt, type(report).__name__, exc.message)
        except PlatformError as exc:
            logger.error(
                "job %s attempt %d: %s not delivered: %s", a.job_id, a.attempt, type(report).__name__, exc.message
            )
        self._jobs_done += 1
        await held.msg.ack()

    # --- What a running job can do -------------------------------------------------------------------

    async def _emit(self, held: _HeldJob, chunk: str) -> None:
        assert self._nc is not None
        payload = encoder.encode(StreamChunk(offset=held.streamed_chars, text=chunk))
        held.streamed_chars += len(chunk)
        await self._nc.publish(subjects.stream_subject(held.assignment.job_id), payload)

    async def _send_progress(self, held: _HeldJob, fraction: float, message: str | None) -> None:
        a = held.assignment
        try:
            await self._send(
                subjects.report_subject(self._worker_id or ""),
                ReportProgress(job_id=a.job_id, attempt=a.attempt, progress=fraction, message=message),
                Accepted,
            )
        except NOT_YOURS as exc:
            # Requeued or finished elsewhere: stop spending the GPU on it.
            logger.warning(
                "job %s attempt %d is no longer this worker's (%s); stopping it", a.job_id, a.attempt, exc.message
            )
            held.ctx.cancelled.set()
        except Exception as exc:  # progress is best effort: it must never disturb the job
            logger.debug("progress of job %s not reported: %s", a.job_id, exc)

    async def _store_object(self, job_id: str, name: str, data: bytes, content_type: str) -> str:
        """Put a large result in the `results` object store as `<job_id>/<name>`; returns that name."""
        assert self._js is not None
        if self._results is None:
            self._results = await self._js.object_store(subjects.RESULTS_BUCKET)
        object_name = f"{job_id}/{name}"
        meta = js_api.ObjectMeta(name=object_name, headers={"Content-Type": [content_type]})
        await self._results.put(object_name, data, meta=meta)
        logger.info("stored %s (%d bytes)", object_name, len(data))
        return object_name


# --- Pure decisions ------------------------------------------------------------------------------------


def preflight(a: Assignment, engines: Mapping[str, BaseEngine], config: WorkerConfig) -> ErrorInfo | None:
    """Why this worker must not run the assignment, or None when it may."""
    engine = engines.get(a.job_type)
    if engine is None:
        return ErrorInfo(
            code="unsupported_job_type", message=f"this worker runs {sorted(engines)}, not {a.job_type!r} jobs"
        )
    if engine.needs_model and not a.model:
        return ErrorInfo(code="model_required", message=f"{a.job_type} jobs must name a model")
    if engine.needs_model and config.models and a.model not in config.models:
        return ErrorInfo(
            code="model_not_allowed",
            message=f"model {a.model!r} is not allowed on this worker; allowed: {sorted(config.models)}",
        )
    return None


def outcome_report(
    a: Assignment, *, cancel_requested: bool, result: Any = None, error: BaseException | None = None
) -> WorkerReport:
    """The report for how a job's run ended: a cancel the platform asked for wins over anything the
    engine did meanwhile; a result must fit in a report (large ones go to the object store)."""
    if cancel_requested:
        return ReportCancelled(job_id=a.job_id, attempt=a.attempt)
    match error:
        case None:
            return _completed(a, result)
        case _Interrupted():
            info = ErrorInfo(code="timeout", message=f"job ran longer than its timeout of {a.timeout_s:g}s")
        case EngineError() | PlatformError():
            info = ErrorInfo(code=error.code, message=_cut(error.message), details=error.details)
        case _:
            info = ErrorInfo(code="engine_error", message=_cut(f"{type(error).__name__}: {error}"))
    return ReportFailed(job_id=a.job_id, attempt=a.attempt, error=info)


def _completed(a: Assignment, result: Any) -> WorkerReport:
    report = ReportCompleted(job_id=a.job_id, attempt=a.attempt, result=result)
    try:
        size_bytes = len(encoder.encode(report))
    except (TypeError, ValueError) as exc:
        info = ErrorInfo(code="bad_result", message=_cut(f"the engine's result is not JSON: {exc}"))
        return ReportFailed(job_id=a.job_id, attempt=a.attempt, error=info)
    if size_bytes > MAX_BODY_BYTES:
        info = ErrorInfo(
            code="result_too_large",
            message=f"the result is {size_bytes} bytes, over the {MAX_BODY_BYTES}-byte limit of a report; "
            "large results belong in the object store (ctx.store_object)",
        )
        return ReportFailed(job_id=a.job_id, attempt=a.attempt, error=info)
    return report


def config_changes(old: WorkerConfig, new: WorkerConfig) -> list[str]:
    """`["max_concurrency: 4 -> 8"]`, one line per top-level setting that differs."""
    before, after = msgspec.to_builtins(old), msgspec.to_builtins(new)
    return [f"{key}: {before[key]} -> {after[key]}" for key in after if before.get(key) != after[key]]


def _cut(message: str) -> str:
    return message if len(message) <= MAX_ERROR_MESSAGE_CHARS else message[: MAX_ERROR_MESSAGE_CHARS - 1] + "…"


# --- Small parts of the runtime ------------------------------------------------------------------------


class _Interrupted(Exception):
    """The job was stopped from outside (a cancel or its timeout) before its engine returned."""


class _HeldJob:
    """A dispatched assignment from receipt to ack."""

    def __init__(self, assignment: Assignment, msg: Msg) -> None:
        self.assignment = assignment
        self.msg = msg
        #: Set once the job holds a concurrency slot (a stop leaves waiting jobs to be redelivered).
        self.running = False
        #: Set by a CancelOrder: the platform asked for the cancel, so the ending is `cancelled`.
        self.cancel_requested = False
        #: Characters streamed so far: each chunk carries its offset, so a reader can tell a gap.
        self.streamed_chars = 0
        self.ctx: JobContext
        self.progress: _Progress
        self.task: asyncio.Task[None]


class _Slots:
    """A semaphore whose size can change while jobs hold it; shrinking never stops a running job."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.used < self.capacity and not self._waiters:
            self.used += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot came just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.used -= 1
        self._wake()

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.capacity:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)


class _Progress:
    """Coalesces one job's progress: at most one report per PROGRESS_INTERVAL_S, the latest value wins,
    and reporting never holds up the job."""

    def __init__(self, send: Callable[[float, str | None], Any]) -> None:
        self._send = send
        self._latest: tuple[float, str | None] | None = None
        self._sent_at = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def offer(self, fraction: float, message: str | None = None) -> None:
        if self._closed:
            return
        self._latest = (min(max(fraction, 0.0), 1.0), message[:1000] if message else message)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._latest is not None:
            wait_s = self._sent_at + PROGRESS_INTERVAL_S - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            fraction, message = self._latest
            self._latest = None
            self._sent_at = loop.time()
            await self._send(fraction, message)

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()


async def _interruptible(coro: Any, ctx: JobContext, *, timeout_s: float | None) -> Any:
    """Await `coro` unless the job is cancelled or `timeout_s` passes; then set `ctx.cancelled` so the
    engine winds down, give it CANCEL_GRACE_S, cut it off and raise `_Interrupted`."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_retrieve)
    stop = asyncio.ensure_future(ctx.cancelled.wait())
    try:
        done, _ = await asyncio.wait({task, stop}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        ctx.cancelled.set()
        await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
        raise _Interrupted
    finally:
        stop.cancel()
        task.cancel()


def _retrieve(task: asyncio.Future[Any]) -> None:
    # An engine that fails after it was cut off has nobody to tell; don't warn about it at exit.
    if not task.cancelled():
        task.exception()


async def _keep_alive(msg: Msg) -> None:
    """Tell JetStream the dispatch is still being worked on, so it is not redelivered meanwhile."""
    while True:
        await asyncio.sleep(DISPATCH_ACK_WAIT_S / 3)
        try:
            await msg.in_progress()
        except Exception as exc:
            logger.debug("could not extend the ack deadline: %s", exc)


def _token(what: str, value: str) -> str:
    try:
        return msgspec.convert(value, Token)
    except msgspec.ValidationError:
        raise ValueError(
            f"{what} {value!r} is not valid: 1-64 letters, digits, '_' or '-', starting with a letter or digit"
        ) from None


def _check_engines(engines: Mapping[str, BaseEngine], models: ModelProvider | None) -> dict[str, BaseEngine]:
    valid = get_args(JobType)
    if not engines:
        raise ValueError(f"a worker needs at least one engine; job types: {', '.join(valid)}")
    for job_type, engine in engines.items():
        if job_type not in valid:
            raise ValueError(f"unknown job type {job_type!r}; valid: {', '.join(valid)}")
        if engine.job_type != job_type:
            raise ValueError(f"{type(engine).__name__} runs {engine.job_type!r} jobs, not {job_type!r}")
        if engine.needs_model and models is None:
            raise ValueError(f"the {job_type} engine loads models: pass a model provider (models=...)")
    return dict(engines)


def save_identity(state_dir: Path, worker_id: str) -> None:
    """Remember the worker's id in its state dir, so a restart comes back as the same worker."""
    write_private(state_dir / STATE_FILE, msgspec.json.encode(WorkerState(worker_id=worker_id)))


def save_credentials(path: Path, credentials: WorkerCredentials) -> None:
    """Keep the worker's credentials (its HMAC secret among them) readable by the owner only."""
    write_private(path, msgspec.json.encode(credentials))
