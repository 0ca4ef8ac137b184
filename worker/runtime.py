"""The worker runtime: a dumb terminal that runs what the platform dispatches to it.

`Worker` owns the lifecycle and composes one runner per concern, each in its own module:
- `worker.link.PlatformLink`: the NATS connection, every (signed, retried) request, token streams and
  result objects;
- `worker.registration.Registration`: registration, the worker's identity and its credentials (rotated
  when a heartbeat's answer says so);
- `worker.config_watch.ConfigWatch`: the runtime config, followed in the `worker-config` KV bucket;
- `worker.heartbeats.Heartbeats`: telemetry and load, on an interval;
- `worker.jobs.JobRunner`: dispatches, from receipt to report and ack;
- `worker.direct.DirectServer`: direct sessions' requests on `direct.<worker_id>`, checked offline.

`start()` connects, registers, reads the runtime config, starts heartbeats and then takes dispatches;
`stop()` undoes it in order (see `_shutdown`). `Worker.from_config` builds a worker the way
`gpu-worker start` runs it (model cache, telemetry of the chosen GPUs, the memory limit), so embedding
one in another program needs no CLI.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, get_args

import msgspec
import nats.errors
import stamina
from nats.js.errors import NotFoundError

from sdk import subjects
from sdk.api import (
    Accepted,
    JobType,
    ReportDraining,
    ReportModelLoaded,
    ReportModelUnloaded,
    Token,
    WorkerConfig,
    WorkerReport,
)
from sdk.errors import PlatformError
from worker.config_watch import ConfigWatch
from worker.direct import DirectServer
from worker.engines.base import BaseEngine
from worker.heartbeats import Heartbeats
from worker.jobs import JobRunner
from worker.link import PlatformLink
from worker.models import LoadedModel, LoadStage, MemoryProbe, ModelCache, ModelProvider
from worker.registration import CREDENTIALS_FILE, Registration
from worker.telemetry import HostTelemetry, gpu_snapshot

if TYPE_CHECKING:
    from worker.config import LocalConfig

logger = logging.getLogger(__name__)

#: How long registration and job reports keep retrying an unanswered gateway (it may be restarting).
REQUEST_RETRY_S = 60.0
#: How long a draining worker waits for the platform to collect its direct sessions' usage.
DIRECT_HANDOVER_S = 5.0


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
        tls: ssl.SSLContext | None = None,
        enrollment_token: str | None = None,
        credentials_path: Path | None = None,
        drain_timeout_s: float = 30.0,
        request_retry_s: float = REQUEST_RETRY_S,
        connect_wait_s: float = 30.0,
    ) -> None:
        """`models` lends loaded models to engines that need them (and names them for heartbeats);
        `telemetry` is called (in a thread) at registration and for each heartbeat. Bad arguments fail
        here, naming the valid choices."""
        self._name = _token("name", name)
        self._engines = _check_engines(engines, models)
        self._models = models
        self._telemetry = telemetry
        self._drain_timeout_s = drain_timeout_s
        self._request_retry_s = request_retry_s
        self._started = False
        self._stop_task: asyncio.Task[None] | None = None
        #: Set when the GPU failed for good (`DeviceLost`): the worker drains, and its process should exit
        #: so the platform requeues its jobs elsewhere and a supervisor starts it afresh.
        self.device_lost = asyncio.Event()
        #: Set when NATS kept refusing this worker's identity (it was revoked): the worker stops at once,
        #: without a drain (nothing it finished could be reported), and its process should exit non-zero.
        self.identity_refused = asyncio.Event()
        #: Set when the NATS client closed the connection for good (it gave up inside a reconnect): the
        #: worker stops without a drain and its process exits non-zero, so a supervisor starts it afresh.
        self.connection_lost = asyncio.Event()

        self._link = PlatformLink(nats_url=nats_url, name=self._name, tls=tls, connect_wait_s=connect_wait_s)
        state_dir = Path(state_dir)
        self._registration = Registration(
            link=self._link,
            name=self._name,
            region=_token("region", region),
            capabilities=sorted(self._engines),  # type: ignore[arg-type]  # checked against JobType
            state_dir=state_dir,
            credentials_path=credentials_path or state_dir / CREDENTIALS_FILE,
            enrollment_token=enrollment_token,
            sample_host=self.sample_host,
        )
        self._config = ConfigWatch(self._link, on_change=self._on_config_change)
        self._jobs = JobRunner(
            link=self._link,
            config=self._config,
            engines=self._engines,
            models=models,
            request_retry_s=request_retry_s,
            on_device_lost=self._on_device_lost,
        )
        self._direct = DirectServer(
            link=self._link, config=self._config, engines=self._engines, models=models,
            on_device_lost=self._on_device_lost,
        )
        self._link.on_reconnect = self._reconnected
        self._link.on_identity_refused = self._on_identity_refused
        self._link.on_connection_lost = self._on_connection_lost
        self._retaking: asyncio.Task[None] | None = None
        self._heartbeats = Heartbeats(
            link=self._link,
            registration=self._registration,
            config=self._config,
            jobs=self._jobs,
            models=models,
            sample_host=self.sample_host,
        )

    @classmethod
    def from_config(
        cls,
        config: LocalConfig,
        engines: Mapping[str, BaseEngine],
        *,
        on_load_progress: Callable[[str, LoadStage], None] | None = None,
    ) -> Worker:
        """The worker as `gpu-worker start` runs it. Heartbeats report the configured GPUs and the memory
        free for models, capped by `memory.limit_bytes`. Engines that load models get a model cache
        (bounded by the same limit) whose loads and unloads are reported to the platform, and whose
        load stages go to `on_load_progress` (a screen, a log)."""
        needs_models = any(engine.needs_model for engine in engines.values())
        # Only engines that load models need to know whether torch sees CUDA (which imports torch);
        # for the others the GPUs NVML reports decide where free memory is measured.
        on_gpu = None if needs_models else bool(gpu_snapshot(config.gpu_indices))
        probe = MemoryProbe(config.gpu_indices, on_gpu=on_gpu)
        limit_bytes = config.memory.limit_bytes

        def telemetry() -> HostTelemetry:
            free_bytes = probe.free_bytes()
            if limit_bytes is not None:
                free_bytes = limit_bytes if free_bytes is None else min(free_bytes, limit_bytes)
            return HostTelemetry(gpus=tuple(gpu_snapshot(config.gpu_indices)), memory_free_bytes=free_bytes)

        cache = ModelCache(probe, limit_bytes=limit_bytes, on_load_progress=on_load_progress) if needs_models else None
        worker = cls(
            config.nats_url,
            name=config.name,
            region=config.region,
            engines=engines,
            state_dir=config.state_dir,
            models=cache,
            telemetry=telemetry,
            tls=config.tls.ssl_context(),
            enrollment_token=config.enrollment_token,
            credentials_path=config.credentials_file,
            drain_timeout_s=config.drain_timeout_s,
        )
        if cache is not None:

            async def on_loaded(model: str, memory_bytes: int) -> None:
                await worker.report(ReportModelLoaded(model=model, memory_bytes=memory_bytes))

            async def on_unloaded(model: str) -> None:
                await worker.report(ReportModelUnloaded(model=model))

            cache.on_loaded, cache.on_unloaded = on_loaded, on_unloaded
        return worker

    # --- What tests and operators look at ----------------------------------------------------------

    @property
    def worker_id(self) -> str | None:
        """The id the platform knows this worker by (None until registered)."""
        return self._registration.worker_id

    @property
    def credentials_generation(self) -> int | None:
        """The generation of the credentials this worker signs with (None before its enrollment)."""
        return self._registration.credentials_generation

    @property
    def region(self) -> str:
        return self._registration.region

    @property
    def engines(self) -> tuple[str, ...]:
        """The job types this worker runs."""
        return tuple(sorted(self._engines))

    @property
    def config(self) -> WorkerConfig:
        """The runtime config in effect (platform defaults merged with this worker's overrides)."""
        return self._config.current

    @property
    def jobs_done(self) -> int:
        """Jobs this worker finished and reported (completed, failed or cancelled) since it started."""
        return self._jobs.jobs_done

    @property
    def in_flight(self) -> tuple[str, ...]:
        """Ids of the jobs this worker holds: running, or waiting for a free slot."""
        return self._jobs.in_flight

    @property
    def connected(self) -> bool:
        """Whether its NATS connection is up now."""
        return self._link.connected

    @property
    def loaded_models(self) -> tuple[LoadedModel, ...]:
        """The models in memory now, with the memory each took."""
        return tuple(self._models.loaded()) if self._models is not None else ()

    async def sample_host(self) -> HostTelemetry | None:
        """This machine's telemetry now (None without a telemetry hook, or when it fails)."""
        if self._telemetry is None:
            return None
        try:
            return await asyncio.to_thread(self._telemetry)  # NVML calls block
        except Exception:
            logger.exception("telemetry failed; reporting without it")
            return None

    async def report(self, report: WorkerReport) -> Accepted:
        """Send a report about a job or this worker (retried while the gateway does not answer)."""
        return await self._link.report(report, retry_for_s=self._request_retry_s)

    # --- Lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, register, read the runtime config, start heartbeats, then take dispatches."""
        if self._started:
            raise RuntimeError("this worker was started already")
        self._started = True
        try:
            await self._registration.connect()
            await self._registration.register(retry_for_s=self._request_retry_s)
            await self._config.start()
            self._heartbeats.start()
            assert self.worker_id is not None
            await self._jobs.start(self.worker_id, self.region)
            await self._direct.start(self.worker_id)
        except BaseException:
            await self.stop(drain=False)
            raise
        logger.info(
            "worker %s (%s) ready in region %s: engines %s, max_concurrency %d",
            self.worker_id, self._name, self.region, list(self.engines), self.config.max_concurrency,
        )

    async def stop(self, drain: bool = True) -> None:
        """Stop; idempotent. With `drain`, running jobs may finish (up to `drain_timeout_s`); without it,
        or when the bound passes, they are abandoned unacked and the platform requeues them. A call with
        `drain=False` during a draining stop cuts the drain short."""
        if not drain:
            self._jobs.abandon()
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

    async def _reconnected(self) -> None:
        """The server may have restarted and lost DISPATCH (memory storage), and this worker's consumer with
        it: look in the background, and make the consumer again once the platform has made the stream again."""
        if self.worker_id is not None and not self._jobs.stopping and (self._retaking is None or self._retaking.done()):
            self._retaking = asyncio.create_task(self._retake_dispatches(self.worker_id))

    async def _retake_dispatches(self, worker_id: str) -> None:
        async for attempt in stamina.retry_context(on=nats.errors.Error, attempts=None, timeout=None):
            with attempt:
                if self._jobs.stopping:
                    return
                try:
                    await self._link.js.consumer_info(subjects.DISPATCH_STREAM, subjects.dispatch_consumer(worker_id))
                    return  # a mere blip: the consumer is still there
                except NotFoundError:
                    pass
                await self._jobs.start(worker_id, self.region)  # no stream yet: NotFoundError, stamina backs off
        logger.info("dispatch consumer of worker %s made again after a broker restart", worker_id)

    async def _shutdown(self, drain: bool) -> None:
        # 1. Take no new dispatches; jobs still waiting for a slot go back to be redelivered. Direct
        #    requests are refused from now on: their clients open a session elsewhere.
        if self._retaking is not None:
            self._retaking.cancel()
        self._direct.draining = True
        await self._jobs.stop_taking()
        # 2. Tell the platform to send nothing more; heartbeats say `draining` from now on.
        if drain and self.worker_id is not None and self._link.connected:
            try:
                await self._link.report(ReportDraining())  # not retried: a stop must not hang on it
            except PlatformError as exc:
                logger.warning("could not report draining: %s", exc)
            self._heartbeats.beat_now()
        # 3. Let running jobs finish, within the bound (heartbeats continue meanwhile, or the platform
        #    would think this worker lost and requeue the very jobs it is finishing). Not while NATS refuses
        #    this worker: what the jobs finish could not be reported, and the platform requeues them anyway.
        #    Meanwhile the platform ends this worker's direct sessions and collects their usage.
        if self._link.refused:
            logger.warning("not waiting for running jobs: NATS refuses this worker, so they cannot report")
        drain_s = self._drain_timeout_s if drain and not self._link.refused else 0.0
        await asyncio.gather(self._jobs.drain(drain_s), self._direct.collected(min(drain_s, DIRECT_HANDOVER_S)))
        # 4. Stop serving direct requests (the platform has had the drain to collect its sessions'
        #    usage), the heartbeats, then the config watch.
        await self._direct.stop()
        await self._heartbeats.stop()
        await self._config.stop()
        # 5. Close the connection, flushing the last acks first.
        await self._link.close()
        logger.info("worker %s stopped after %d jobs", self.worker_id or self._name, self.jobs_done)

    def _on_device_lost(self) -> None:
        if not self.device_lost.is_set():
            logger.error("the GPU is in an error state every later job would hit: draining, then exiting")
            self.device_lost.set()
            # Taking no more work at once; the drain reports `draining` and lets the other jobs end.
            asyncio.get_running_loop().create_task(self.stop(drain=True))

    def _on_identity_refused(self) -> None:
        logger.error(
            "NATS has refused this worker's identity (%s) for %.0fs: it was revoked, or its credentials are "
            "another installation's. Stopping; enroll it again with a new token (`gpuctl workers enroll`, then "
            "`gpu-worker configure --enrollment-token ...`)",
            self.worker_id, self._link.connect_wait_s,
        )
        self.identity_refused.set()
        asyncio.get_running_loop().create_task(self.stop(drain=False))

    def _on_connection_lost(self) -> None:
        if not self._jobs.stopping and not self.connection_lost.is_set():
            logger.error("worker %s lost its NATS connection for good: stopping, to be started afresh", self.worker_id)
            self.connection_lost.set()
            asyncio.get_running_loop().create_task(self.stop(drain=False))

    def _on_config_change(self, config: WorkerConfig) -> None:
        self._jobs.resize(config.max_concurrency)
        self._heartbeats.beat_now()  # the platform sees the new capacity (and interval) at once


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
