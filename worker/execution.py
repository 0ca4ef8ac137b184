"""Running one job, or one direct request, on its engine: the model leased from the cache for the whole run
(so the cache never evicts a model in use, even from a run cut off after its grace), the run's timeout, and
its cancel. A cancelled or timed-out run raises `Interrupted` (what it reports is `outcomes`' decision).
`EngineHost` is what the job runner (`worker.jobs`) and the direct server (`worker.direct`) share: the
platform, the config, the engines and their models, and what a lost GPU sets off.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sdk.api import ModelSettings, WorkerConfig
from sdk.events import Assignment
from worker.config_watch import ConfigWatch
from worker.engines.base import BaseEngine, DeviceLost, JobContext, ModelSpec
from worker.link import PlatformLink
from worker.models import ModelProvider
from worker.outcomes import Interrupted

#: After a cancel or a timeout, how long an engine may take to wind down before it is cut off.
CANCEL_GRACE_S = 5.0


@dataclass(eq=False, kw_only=True)
class EngineHost:
    link: PlatformLink
    config: ConfigWatch
    engines: Mapping[str, BaseEngine]
    models: ModelProvider | None
    #: Called when a run found the GPU in an error state no later run can escape (`DeviceLost`).
    on_device_lost: Callable[[], None] | None = None

    async def run(self, a: Assignment, ctx: JobContext, timeout_s: float | None, *, cancellable: bool = True) -> Any:
        """`run_engine` on the engine of `a`'s type, with the config in effect now."""
        try:
            return await run_engine(
                self.engines[a.job_type], self.models, self.config.current, a.model, ctx, timeout_s,
                cancellable=cancellable,
            )
        except DeviceLost:
            if self.on_device_lost is not None:
                self.on_device_lost()
            raise


async def run_engine(
    engine: BaseEngine, models: ModelProvider | None, config: WorkerConfig, model_name: str | None,
    ctx: JobContext, timeout_s: float | None, *, cancellable: bool = True,
) -> Any:
    """Run one job (or direct request) on `engine`; an `Interrupted` run was cancelled or timed out.
    Without `cancellable` (a direct request: nothing but its deadline stops it) the run is bounded by
    `asyncio.timeout` alone, which spares the watcher task per run (about a tenth of a direct round trip)."""
    if not cancellable and not engine.needs_model:
        try:
            async with asyncio.timeout(timeout_s) as deadline:
                return await engine.inference(None, ctx)
        except TimeoutError:
            if deadline.expired():
                raise Interrupted from None
            raise
    async with contextlib.AsyncExitStack() as model_lease:
        model = None
        if engine.needs_model:
            # Held until the run ends, so the cache never evicts a model in use. The timeout bounds the
            # run's own work; loading is the cache's, and only a cancel interrupts it.
            assert models is not None and model_name is not None  # construction and preflight
            settings = config.models.get(model_name, ModelSettings())
            lease = model_lease.enter_async_context(models.use(engine, ModelSpec(name=model_name, settings=settings)))
            model = await _interruptible(lease, ctx, timeout_s=None)
        return await _interruptible(engine.inference(model, ctx), ctx, timeout_s=timeout_s)


async def _interruptible(coro: Any, ctx: JobContext, *, timeout_s: float | None) -> Any:
    """Await `coro` unless the job is cancelled or `timeout_s` passes; then set `ctx.cancelled` so the
    engine winds down, give it CANCEL_GRACE_S, cut it off and raise `Interrupted`."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_retrieve)
    stop = asyncio.ensure_future(ctx.cancelled.wait())
    try:
        done, _ = await asyncio.wait({task, stop}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        ctx.cancelled.set()
        await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
        raise Interrupted
    finally:
        stop.cancel()
        task.cancel()


def _retrieve(task: asyncio.Future[Any]) -> None:
    # An engine that fails after it was cut off has nobody to tell; don't warn about it at exit.
    if not task.cancelled():
        task.exception()
