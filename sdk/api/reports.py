"""What a worker reports about its jobs and models (`api.workers.report.<worker_id>`), and the acks."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from sdk.api.decoding import ModelName, Strict
from sdk.events import ErrorInfo


class Report(Strict, tag_field="kind"):
    pass


class JobReport(Report):
    job_id: str
    attempt: Annotated[int, msgspec.Meta(ge=1)]


class ReportStarted(JobReport, tag="started"):
    pass


class ReportProgress(JobReport, tag="progress"):
    progress: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
    message: Annotated[str, msgspec.Meta(max_length=1000)] | None = None


class OutcomeReport(JobReport, kw_only=True):
    """How an attempt ended. `with_start`: it ended before its start was reported (a short job), and this
    one request stands for both reports: the gateway appends `JobStarted`, then the ending, together."""

    with_start: bool = False


class ReportCompleted(OutcomeReport, tag="completed"):
    result: Any = None


class ReportFailed(OutcomeReport, tag="failed"):
    error: ErrorInfo


class ReportCancelled(OutcomeReport, tag="cancelled"):
    pass


class ReportModelLoaded(Report, tag="model_loaded"):
    model: ModelName
    memory_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0


class ReportModelUnloaded(Report, tag="model_unloaded"):
    model: ModelName


class ReportDraining(Report, tag="draining"):
    pass


WorkerReport = (
    ReportStarted
    | ReportProgress
    | ReportCompleted
    | ReportFailed
    | ReportCancelled
    | ReportModelLoaded
    | ReportModelUnloaded
    | ReportDraining
)


class Accepted(msgspec.Struct, kw_only=True, tag_field="kind", tag="ok"):
    seq: int = 0


class HeartbeatAck(msgspec.Struct, kw_only=True, tag_field="kind", tag="ok"):
    #: False when the platform no longer knows this worker as online: it must register again.
    registered: bool = True
    #: True when the worker's credentials are due for rotation (old, or an operator asked): it calls
    #: `api.workers.rotate.<worker_id>` and switches to the credentials in the reply.
    rotate: bool = False
