"""Heartbeats: the worker's telemetry and load, sent to the platform on an interval.

One heartbeat at start, then one per `heartbeat_interval_s` of the runtime config, and one at once when
something the platform ranks workers by changed (`beat_now`: a new capacity, a drain). Wake-ups are
coalesced: however many come during one heartbeat, one more is sent, with the latest state. The answer
may ask the worker to rotate its credentials, or say the platform no longer knows it as online (it was
declared lost): then it registers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sdk import subjects
from sdk.api import HeartbeatAck
from sdk.errors import PlatformError, Unauthorized, WorkerNotFound
from sdk.events import Heartbeat
from sdk.tasks import cancel_and_wait
from worker.config_watch import ConfigWatch
from worker.jobs import JobRunner
from worker.link import PlatformLink
from worker.models import ModelProvider
from worker.registration import Registration
from worker.telemetry import HostTelemetry

logger = logging.getLogger(__name__)


@dataclass(eq=False, kw_only=True)
class Heartbeats:
    """Sends this worker's heartbeats until stopped."""

    link: PlatformLink
    registration: Registration
    config: ConfigWatch
    jobs: JobRunner
    #: Names the loaded models, for the scheduler to prefer this worker for them.
    models: ModelProvider | None
    sample_host: Callable[[], Awaitable[HostTelemetry | None]]
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def beat_now(self) -> None:
        """Send a heartbeat at once (or right after the one being sent)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop sending; idempotent."""
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._beat()
            except Exception:
                logger.exception("heartbeat failed")
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that meets a wake-up.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.current.heartbeat_interval_s):
                    await self._wake.wait()

    async def _beat(self) -> None:
        worker_id = self.registration.worker_id
        assert worker_id is not None
        sample = await self.sample_host()
        config = self.config.current
        beat = Heartbeat(
            worker_id=worker_id,
            region=self.registration.region,
            interval_s=config.heartbeat_interval_s,
            max_concurrency=config.max_concurrency,
            in_flight=self.jobs.in_flight,
            loaded_models=tuple(m.model for m in self.models.loaded()) if self.models else (),
            gpus=tuple(sample.gpus) if sample else (),
            memory_free_bytes=sample.memory_free_bytes if sample else None,
            jobs_done=self.jobs.jobs_done,
            draining=self.jobs.stopping,
        )
        try:
            # Waited for one interval at most: a heartbeat that went to a gateway that died with it gets no
            # answer, and waiting the link's whole request timeout (5 s) silenced the worker for ten 0.5 s
            # intervals, so the scheduler declared it lost (docs/reliability.md). The next one goes instead.
            async with asyncio.timeout(config.heartbeat_interval_s):
                ack = await self.link.send(subjects.heartbeat_request_subject(worker_id), beat, HeartbeatAck)
        except TimeoutError:
            logger.warning("heartbeat not answered within its interval (%gs); sending the next", config.heartbeat_interval_s)
            return
        except WorkerNotFound:
            ack = HeartbeatAck(registered=False)
        except Unauthorized as exc:
            logger.error("heartbeat refused: %s; this worker needs a new enrollment if it was revoked", exc.message)
            return
        except PlatformError as exc:
            logger.warning("heartbeat not accepted: %s", exc.message)
            return
        if ack.rotate and ack.registered and not self.jobs.stopping:
            try:
                await self.registration.rotate()
            except PlatformError as exc:
                logger.warning("credential rotation failed (the next heartbeat retries): %s", exc.message)
        if not ack.registered and not self.jobs.stopping:
            logger.warning("the platform no longer knows worker %s as online; registering again", worker_id)
            try:
                await self.registration.register(retry_for_s=0.0)
            except PlatformError as exc:
                logger.warning("registering again failed (next heartbeat retries): %s", exc.message)
