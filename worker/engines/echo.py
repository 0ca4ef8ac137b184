"""The echo engine: returns its params. It needs no model and no GPU, so the whole platform (placement,
dispatch, streaming, progress, cancel, timeouts, failures) can be exercised anywhere.

Params, besides anything else to echo back:
- `sleep_s` (0..3600): wait this long first, reporting progress; a cancel ends the wait at once.
- `chunks` (list of strings): emitted one by one to the job's stream before returning.
- `fail` (string): fail the job with code `echo_failed` and this message (after the sleep).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Annotated, Any, ClassVar

import msgspec

from worker.engines.base import BaseEngine, EngineError, JobContext

logger = logging.getLogger(__name__)

MAX_SLEEP_S = 3600.0
#: How often a sleeping echo job reports progress (the runtime rate-limits the reports anyway).
PROGRESS_STEP_S = 0.25


class EchoParams(msgspec.Struct, kw_only=True):
    """The params the engine acts on; other keys are only echoed back."""

    sleep_s: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_SLEEP_S)] = 0.0
    chunks: list[str] = []
    fail: str | None = None


class EchoEngine(BaseEngine):
    job_type: ClassVar[str] = "echo"
    needs_model: ClassVar[bool] = False

    async def inference(self, model: Any, ctx: JobContext) -> Any:
        params = parse_params(ctx.params)
        if params.sleep_s > 0:
            await _sleep(params.sleep_s, ctx)
        for chunk in params.chunks:
            if ctx.cancelled.is_set():
                raise _cancelled(ctx)
            await ctx.emit(chunk)
        if params.fail is not None:
            raise EngineError("echo_failed", params.fail)
        return ctx.params


def parse_params(params: dict[str, Any]) -> EchoParams:
    try:
        return msgspec.convert(params, EchoParams)
    except msgspec.ValidationError as exc:
        raise EngineError("bad_params", f"invalid echo params: {exc}") from None


async def _sleep(sleep_s: float, ctx: JobContext) -> None:
    """Wait `sleep_s`, reporting the elapsed fraction; return early (raising) when cancelled."""
    started = time.monotonic()
    while (elapsed_s := time.monotonic() - started) < sleep_s:
        await ctx.progress(elapsed_s / sleep_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(PROGRESS_STEP_S, sleep_s - elapsed_s)):
                await ctx.cancelled.wait()
        if ctx.cancelled.is_set():
            raise _cancelled(ctx)
    await ctx.progress(1.0)


def _cancelled(ctx: JobContext) -> EngineError:
    logger.info("echo job %s stopped: cancelled", ctx.job_id)
    return EngineError("cancelled", f"job {ctx.job_id} was cancelled")
