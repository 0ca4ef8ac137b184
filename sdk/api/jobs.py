"""Jobs: submit, read, list, cancel, wait for, stream and fetch the results of a job."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec

from sdk.api.decoding import ModelName, Strict, Token
from sdk.events import ErrorInfo, JobEvent

if TYPE_CHECKING:  # sdk.jobs decides on these requests, so it imports this module at run time
    from sdk.jobs import Job

JobType = Literal["echo", "llm", "image", "embedding"]
#: Job types that run a model, so a submission must name one.
NEEDS_MODEL: tuple[JobType, ...] = ("llm", "image", "embedding")
#: The largest stream sequence a request may name: the largest integer every JSON reader keeps exactly
#: (a float64's 2**53), far beyond what a log reaches.
MAX_SEQ = 2**53 - 1
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
#: A list cursor: the submission sequence to continue below, as `JobPage.next_cursor` gave it.
CURSOR_PATTERN = r"^[1-9][0-9]{0,18}$"
#: How a job treats its `region` (`sdk.regions` says what each means); `nearest` when a region is set.
RegionPolicy = Literal["nearest", "strict", "any"]


class Placed(Protocol):
    """A request that placement reads: a job's submission or a direct session's opening."""

    type: str
    model: str | None
    region: str | None
    region_policy: str | None
    max_latency_ms: float | None


def check_placement(req: Placed, what: str) -> None:
    """What a request that is placed (a job, a direct session) must say together: a `model` for the types
    that run one, a `region` for a policy that needs it, `max_latency_ms` only with `nearest`."""
    if req.type in NEEDS_MODEL and req.model is None:
        raise ValueError(f"`model` is required for {req.type} {what}")
    if req.region is None and req.region_policy in ("nearest", "strict"):
        raise ValueError(f"`region_policy` {req.region_policy} needs a `region`")
    if req.max_latency_ms is not None and (req.region is None or req.region_policy not in (None, "nearest")):
        raise ValueError("`max_latency_ms` needs a `region` and the `nearest` region policy")


class SubmitJob(Strict):
    type: JobType
    model: ModelName | None = None
    params: dict[str, Any] = {}
    region: Token | None = None
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)] = 300.0
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    #: None: `nearest` when `region` is set, `any` when it is not.
    region_policy: RegionPolicy | None = None
    #: With `nearest`: never run farther than this from `region` (by the operator's latency table).
    max_latency_ms: Annotated[float, msgspec.Meta(ge=0, le=60_000)] | None = None
    #: POSTed the job's view, signed, when the job ends (see docs/webhooks.md).
    webhook_url: Annotated[str, msgspec.Meta(max_length=2048, pattern=r"^https?://[^\s]+$")] | None = None

    def __post_init__(self) -> None:
        check_placement(self, "jobs")


class Submitted(msgspec.Struct, kw_only=True):
    id: str
    status: str
    seq: int
    #: False when an idempotency key matched an earlier submission (nothing was appended).
    created: bool = True


#: An RFC 3339 time as a request names it (`sdk.history.parse_time` reads it).
Moment = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class GetJob(Strict):
    id: Token
    min_seq: Seq | None = None
    #: Time travel (`gateway.history`): the job as it was at this JOBS sequence, or at this moment.
    at_seq: Seq | None = None
    at_time: Moment | None = None


class ListJobs(Strict):
    status: str | None = None
    type: str | None = None
    worker_id: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50
    cursor: str | None = None
    min_seq: Seq | None = None
    at_seq: Seq | None = None
    at_time: Moment | None = None


class OwnedGetJob(GetJob):
    """`GetJob` as the gateway forwards it to the projections: with a client's API key id (None for an
    operator), so another client's job reads as not found. Never accepted from a client."""

    owner: str | None = None


class OwnedListJobs(ListJobs):
    """`ListJobs` as the gateway forwards it to the projections: with a client's API key id (None for an
    operator), so a client lists only its own jobs. Never accepted from a client."""

    owner: str | None = None


class CancelJob(Strict):
    id: Token
    reason: Annotated[str, msgspec.Meta(max_length=500)] | None = None


class CancelAccepted(msgspec.Struct, kw_only=True):
    id: str
    #: `cancelled` for a job that was still queued, `cancel_requested` for one a worker holds.
    status: str
    seq: int


class WaitJob(Strict):
    id: Token
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 60.0


class GetResult(Strict):
    id: Token
    index: Annotated[int, msgspec.Meta(ge=0, le=63)] = 0


class JobEventsRequest(Strict):
    id: Token


class EventRecord(msgspec.Struct, kw_only=True):
    seq: int
    event: JobEvent


class JobEvents(msgspec.Struct, kw_only=True):
    items: list[EventRecord]


class StreamChunk(msgspec.Struct, kw_only=True):
    """A piece of a running job's output on `stream.<job_id>`; `offset` is where it starts in the text."""

    offset: int
    text: str


class JobView(msgspec.Struct, kw_only=True):
    id: str
    type: str
    model: str | None
    status: str
    region: str | None
    worker_id: str | None
    attempt: int
    params: dict[str, Any]
    result: Any
    error: ErrorInfo | None
    submitted_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    priority: int = 0
    max_attempts: int = 3
    timeout_s: float = 300.0
    progress: float | None = None
    cancel_requested: bool = False
    seq: int = 0
    region_policy: str | None = None
    max_latency_ms: float | None = None


class JobPage(msgspec.Struct, kw_only=True):
    items: list[JobView]
    next_cursor: str | None = None


def ms_to_datetime(ms: int | None) -> dt.datetime | None:
    return None if ms is None else dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def job_view(job: Job) -> JobView:
    return JobView(
        id=job.id,
        type=job.type,
        model=job.model,
        status=job.status.value,
        region=job.region,
        worker_id=job.worker_id,
        attempt=job.attempt,
        params=job.params,
        result=job.result,
        error=job.error,
        submitted_at=ms_to_datetime(job.submitted_at_ms),
        started_at=ms_to_datetime(job.started_at_ms),
        finished_at=ms_to_datetime(job.finished_at_ms),
        priority=job.priority,
        max_attempts=job.max_attempts,
        timeout_s=job.timeout_s,
        progress=job.progress,
        cancel_requested=job.cancel_requested,
        seq=job.seq,
        region_policy=job.region_policy,
        max_latency_ms=job.max_latency_ms,
    )
