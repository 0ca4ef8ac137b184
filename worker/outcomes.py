"""The worker's decisions about a job, as pure functions: may it run here, and what its ending reports.

- `preflight`: a job of a type this worker does not run, without the model its engine needs, or with a
  model the runtime config does not allow here, is refused before anything runs.
- `outcome_report`: a cancel the platform asked for wins over anything the engine did meanwhile; a job
  cut off by its timeout fails with `timeout`; an engine's error keeps its code; a result must be JSON
  and fit in a report (large results go to the object store).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdk.api import (
    MAX_BODY_BYTES,
    OutcomeReport,
    ReportCancelled,
    ReportCompleted,
    ReportFailed,
    WorkerConfig,
)
from sdk.errors import PlatformError
from sdk.events import Assignment, ErrorInfo, encoder
from worker.engines.base import BaseEngine, EngineError

#: Error messages are cut to this length, so a failure report always fits in a request.
MAX_ERROR_MESSAGE_CHARS = 4000


class Interrupted(Exception):
    """The job was stopped from outside (a cancel or its timeout) before its engine returned."""


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
) -> OutcomeReport:
    """The report for how a job's run ended."""
    if cancel_requested:
        return ReportCancelled(job_id=a.job_id, attempt=a.attempt)
    match error:
        case None:
            return _completed(a, result)
        case Interrupted():
            info = ErrorInfo(code="timeout", message=f"job ran longer than its timeout of {a.timeout_s:g}s")
        case EngineError() | PlatformError():
            info = ErrorInfo(code=error.code, message=_cut(error.message), details=error.details)
        case _:
            info = ErrorInfo(code="engine_error", message=_cut(f"{type(error).__name__}: {error}"))
    return ReportFailed(job_id=a.job_id, attempt=a.attempt, error=info)


def _completed(a: Assignment, result: Any) -> OutcomeReport:
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


def _cut(message: str) -> str:
    return message if len(message) <= MAX_ERROR_MESSAGE_CHARS else message[: MAX_ERROR_MESSAGE_CHARS - 1] + "…"
