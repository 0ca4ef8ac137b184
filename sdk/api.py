"""Requests and replies of the platform's API: the same structs over HTTP and over NATS.

Every input from outside is decoded into one of these with msgspec; a value that does not fit is a
`BadRequest` naming the field, and nothing is appended.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from sdk.errors import BadRequest
from sdk.events import ErrorInfo, GpuInfo, JobEvent

if TYPE_CHECKING:  # sdk.jobs decides on these requests, so it imports this module at run time
    from sdk.jobs import Job

JobType = Literal["echo", "llm", "image"]
#: Job types that run a model, so a submission must name one.
NEEDS_MODEL: tuple[JobType, ...] = ("llm", "image")
#: Regions, names and ids become NATS subject tokens and KV keys: no dots, spaces or wildcards.
TOKEN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN)]
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
#: The largest stream sequence a request may name: the largest integer every JSON reader keeps exactly
#: (a float64's 2**53), far beyond what a log reaches.
MAX_SEQ = 2**53 - 1
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
#: A list cursor: the submission sequence to continue below, as `JobPage.next_cursor` gave it.
CURSOR_PATTERN = r"^[1-9][0-9]{0,18}$"

MAX_BODY_BYTES = 1_048_576


class Strict(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of inputs from outside: an unknown field is an error, not silently dropped."""


# --- Jobs ----------------------------------------------------------------------------------------


class SubmitJob(Strict):
    type: JobType
    model: ModelName | None = None
    params: dict[str, Any] = {}
    region: Token | None = None
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=7 * 86400)] = 300.0
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None

    def __post_init__(self) -> None:
        if self.type in NEEDS_MODEL and self.model is None:
            raise ValueError(f"`model` is required for {self.type} jobs")


class Submitted(msgspec.Struct, kw_only=True):
    id: str
    status: str
    seq: int
    #: False when an idempotency key matched an earlier submission (nothing was appended).
    created: bool = True


class GetJob(Strict):
    id: Token
    min_seq: Seq | None = None


class ListJobs(Strict):
    status: str | None = None
    type: str | None = None
    worker_id: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50
    cursor: str | None = None
    min_seq: Seq | None = None


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
    )


# --- Workers -------------------------------------------------------------------------------------


#: What a worker can be, as the read model says (`projections.store.WorkerStatus` holds the same values).
WorkerStatusName = Literal["online", "draining", "lost", "deregistered"]


class WorkerView(msgspec.Struct, kw_only=True):
    id: str
    name: str
    region: str
    status: WorkerStatusName
    capabilities: list[str]
    #: How many jobs it runs at once (its `max_concurrency`).
    capacity: int
    in_flight: list[str]
    last_heartbeat: dt.datetime | None
    loaded_models: list[str] = []
    gpus: list[GpuInfo] = []
    seq: int = 0


class WorkerPage(msgspec.Struct, kw_only=True):
    items: list[WorkerView]


class GetWorker(Strict):
    id: Token


class ListWorkers(Strict):
    region: str | None = None
    status: str | None = None


class RegisterWorker(Strict):
    name: Token
    region: Token
    capabilities: list[JobType] = msgspec.field(default_factory=lambda: ["echo"])
    gpus: list[GpuInfo] = []
    #: A worker that registered before passes its id to come back as itself.
    worker_id: Token | None = None
    #: One-use enrollment token: how a new worker registers (a returning one signs its request instead).
    enrollment_token: str | None = None


class WorkerCredentials(msgspec.Struct, frozen=True, kw_only=True):
    """What an enrolled (or rotated) worker receives, once; the platform keeps none of it. The worker
    stores it (mode 0600) and signs every request with `hmac_secret_hex`."""

    worker_id: str
    access_token: str
    refresh_token: str
    hmac_secret_hex: str
    generation: int
    expires_in_s: float
    refresh_expires_in_s: float


class Registered(msgspec.Struct, kw_only=True):
    worker_id: str
    region: str
    seq: int
    #: New credentials, present when the registration spent an enrollment token (shown once).
    credentials: WorkerCredentials | None = None


class RotateCredentials(Strict):
    """A worker asks for its next credential generation (`api.workers.rotate.<worker_id>`, signed)."""


class ModelSettings(Strict):
    #: Runs code shipped with the model; off unless the platform turns it on for that model.
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


class LoadControl(Strict):
    #: The share of offered work this worker accepts (0..1), honoured by the scheduler.
    acceptance_rate: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0


class WorkerConfig(Strict):
    """Runtime configuration: owned by the platform, pushed to the worker through a KV watch."""

    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 4
    heartbeat_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    load_control: LoadControl = msgspec.field(default_factory=LoadControl)
    #: Allowed models and their settings; empty means any model may run.
    models: dict[str, ModelSettings] = {}


class GetWorkerConfig(Strict):
    id: Token


class LoadControlChanges(Strict):
    acceptance_rate: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None | msgspec.UnsetType = msgspec.UNSET


class WorkerConfigChanges(Strict):
    """A partial `WorkerConfig`: a key left out stays as it is, a key set to null goes back to what the
    worker inherits, and `models` is replaced whole. `changes()` gives the dict to merge."""

    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None | msgspec.UnsetType = msgspec.UNSET
    heartbeat_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None | msgspec.UnsetType = msgspec.UNSET
    load_control: LoadControlChanges | None | msgspec.UnsetType = msgspec.UNSET
    models: dict[str, ModelSettings] | None | msgspec.UnsetType = msgspec.UNSET

    def changes(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


class SetWorkerConfig(Strict):
    id: Token
    #: Merged over the worker's current overrides.
    changes: WorkerConfigChanges


class WorkerConfigView(msgspec.Struct, kw_only=True):
    worker_id: str
    effective: WorkerConfig
    overrides: dict[str, Any]
    revision: int = 0


# --- Worker reports (api.workers.report.<worker_id>) ---------------------------------------------


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


class ReportCompleted(JobReport, tag="completed"):
    result: Any = None


class ReportFailed(JobReport, tag="failed"):
    error: ErrorInfo


class ReportCancelled(JobReport, tag="cancelled"):
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


# --- Credentials (api.auth.*, /api/v1/auth/*, /api/v1/admin/*) ------------------------------------

#: What an API key may do: `operator` manages keys and workers and sees every job; `client` submits
#: jobs and sees its own.
ApiKeyRole = Literal["client", "operator"]
#: The shapes of the platform's credentials (`gfk_<id>.<secret>`, `gfr_<family>.<counter>.<mac>`), so
#: a client learns from the document what a key looks like; whether one is valid only the gateway knows.
#: Anything longer is not ours: refusing it early bounds the work it causes.
ApiKey = Annotated[str, msgspec.Meta(max_length=2048, pattern=r"^gfk_[0-9a-f]{1,64}\.[A-Za-z0-9_-]+$")]
RefreshToken = Annotated[
    str, msgspec.Meta(max_length=2048, pattern=r"^gfr_[0-9a-f]{1,64}\.[0-9]{1,12}\.[A-Za-z0-9_-]+$")
]
#: An API key's id (the part of the key before the dot, after `gfk_`).
KEY_ID_PATTERN = r"^[0-9a-f]{1,64}$"


class IssueTokens(Strict):
    api_key: ApiKey


class RefreshTokens(Strict):
    refresh_token: RefreshToken


class TokenPair(msgspec.Struct, frozen=True, kw_only=True):
    access_token: str
    refresh_token: str
    expires_in_s: float
    refresh_expires_in_s: float
    token_type: str = "Bearer"


class CreateApiKey(Strict):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    role: ApiKeyRole = "client"


class ApiKeyCreated(msgspec.Struct, kw_only=True):
    key_id: str
    name: str
    role: str
    #: The key itself: shown this once, stored only as a digest.
    api_key: str


class ApiKeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    name: str
    role: str
    created_at_ms: int
    revoked_at_ms: int | None = None


class ApiKeyList(msgspec.Struct, kw_only=True):
    items: list[ApiKeyInfo]


class CreateEnrollment(Strict):
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=30 * 86400)] = 3600.0
    #: Only this worker id may use the token (needed to enroll a known worker again).
    worker_id: Token | None = None


class EnrollmentCreated(msgspec.Struct, kw_only=True):
    #: One use, until `expires_at_ms`; shown this once.
    enrollment_token: str
    expires_at_ms: int
    worker_id: str | None = None


class WorkerAction(msgspec.Struct, kw_only=True):
    """The outcome of an operator's action on a worker's credentials."""

    worker_id: str
    #: `rotation_requested` (the worker rotates at its next heartbeat) or `revoked`.
    status: str


# --- Decoding from outside -----------------------------------------------------------------------

_decoders: dict[type, msgspec.json.Decoder] = {}


def decode(data: bytes, kind: Any) -> Any:
    """Decode untrusted JSON into `kind`; any mismatch becomes a `BadRequest` naming the field."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    if len(data) > MAX_BODY_BYTES:
        raise BadRequest(f"body is {len(data)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRequest(str(exc)) from None


def convert(obj: Any, kind: Any) -> Any:
    """Validate an already-parsed object (query parameters, a merged config) into `kind`."""
    try:
        return msgspec.convert(obj, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc)) from None
