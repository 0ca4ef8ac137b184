"""The event log's vocabulary: immutable, past-tense facts about jobs and workers.

Schemas evolve by adding fields with defaults or new event types, never by changing a field's type.
`SCHEMA_VERSION` travels with every event so old readers can tell what they are looking at.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

SCHEMA_VERSION = 1


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    at_ms: int = msgspec.field(default_factory=now_ms)
    v: int = SCHEMA_VERSION


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Why a job failed: a stable machine-readable code plus a sentence for people."""

    code: str
    message: str
    details: dict[str, Any] | None = None


# --- Job events (subject `jobs.<job_id>`) --------------------------------------------------------


class JobSubmitted(Event, frozen=True, tag="job.submitted"):
    job_id: str
    job_type: str
    model: str | None = None
    params: dict[str, Any] = {}
    region: str | None = None
    priority: int = 0
    max_attempts: int = 3
    timeout_s: float = 300.0
    idempotency_key: str | None = None
    #: The principal that submitted the job (its API key id); None for jobs from before authentication.
    owner: str | None = None
    #: `nearest`, `strict` or `any` (`sdk.regions.effective_policy`); None: the default for `region`.
    region_policy: str | None = None
    #: With `nearest`: the farthest the job may run from `region`, by the operator's latency table.
    max_latency_ms: float | None = None
    #: Where the platform POSTs the job's view, signed, once the job ends.
    webhook_url: str | None = None


class JobAssigned(Event, frozen=True, tag="job.assigned"):
    job_id: str
    worker_id: str
    region: str
    attempt: int
    #: How far the worker's region is from the job's (None: the job named no region, or the distance is
    #: unknown), and why it won, in words: kept in the log so a placement explains itself later.
    distance_ms: float | None = None
    rank: str | None = None


class JobStarted(Event, frozen=True, tag="job.started"):
    job_id: str
    worker_id: str
    attempt: int


class JobProgress(Event, frozen=True, tag="job.progress"):
    job_id: str
    worker_id: str
    attempt: int
    progress: float
    message: str | None = None


class JobEnded(Event, frozen=True):
    """What the four events that end a job share (`case JobEnded()` matches any ending). Never appended
    itself, and it adds no field: each ending's wire form is its own."""


class JobCompleted(JobEnded, frozen=True, tag="job.completed"):
    job_id: str
    worker_id: str
    attempt: int
    result: Any = None


class JobFailed(JobEnded, frozen=True, tag="job.failed"):
    job_id: str
    worker_id: str | None
    attempt: int
    error: ErrorInfo


class JobRequeued(Event, frozen=True, tag="job.requeued"):
    job_id: str
    #: The attempt the job will run as next (the previous one + 1).
    attempt: int
    reason: str


class JobCancelRequested(Event, frozen=True, tag="job.cancel_requested"):
    job_id: str
    reason: str | None = None


class JobCancelled(JobEnded, frozen=True, tag="job.cancelled"):
    job_id: str
    reason: str | None = None


class JobExpired(JobEnded, frozen=True, tag="job.expired"):
    job_id: str


class JobWebhookDelivered(Event, frozen=True, tag="job.webhook_delivered"):
    """The job's webhook was answered with a 2xx."""

    job_id: str
    url: str
    #: 1 for the first try after the job ended (or after a redelivery was asked for), + 1 per retry.
    attempt: int
    status_code: int
    duration_ms: float


class JobWebhookFailed(Event, frozen=True, tag="job.webhook_failed"):
    job_id: str
    url: str
    attempt: int
    reason: str
    status_code: int | None = None
    duration_ms: float | None = None
    #: When the next try is due; None when there is none (gave up, or the target is refused).
    retry_in_s: float | None = None


class JobWebhookRedeliveryRequested(Event, frozen=True, tag="job.webhook_redelivery_requested"):
    job_id: str


JobEvent = (
    JobSubmitted
    | JobAssigned
    | JobStarted
    | JobProgress
    | JobCompleted
    | JobFailed
    | JobRequeued
    | JobCancelRequested
    | JobCancelled
    | JobExpired
    | JobWebhookDelivered
    | JobWebhookFailed
    | JobWebhookRedeliveryRequested
)

# --- Worker events (subject `workers.<worker_id>`) -----------------------------------------------


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int = 0
    memory_free_bytes: int = 0
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None


class WorkerRegistered(Event, frozen=True, tag="worker.registered"):
    worker_id: str
    name: str
    region: str
    #: Job types this worker has engines for (`echo`, `llm`, `image`).
    capabilities: tuple[str, ...] = ("echo",)
    gpus: tuple[GpuInfo, ...] = ()


class WorkerModelLoaded(Event, frozen=True, tag="worker.model_loaded"):
    worker_id: str
    model: str
    memory_bytes: int = 0


class WorkerModelUnloaded(Event, frozen=True, tag="worker.model_unloaded"):
    worker_id: str
    model: str


class WorkerDraining(Event, frozen=True, tag="worker.draining"):
    worker_id: str


class WorkerLost(Event, frozen=True, tag="worker.lost"):
    worker_id: str
    reason: str


class WorkerDeregistered(Event, frozen=True, tag="worker.deregistered"):
    worker_id: str
    reason: str | None = None


class WorkerCredentialsRotated(Event, frozen=True, tag="worker.credentials_rotated"):
    """Credentials changed; the event names the new generation, never the secret itself."""

    worker_id: str
    generation: int


WorkerEvent = (
    WorkerRegistered
    | WorkerModelLoaded
    | WorkerModelUnloaded
    | WorkerDraining
    | WorkerLost
    | WorkerDeregistered
    | WorkerCredentialsRotated
)

# --- Direct sessions (subject `sessions.<session_id>`) --------------------------------------------


class DirectSessionOpened(Event, frozen=True, tag="session.opened"):
    """A client leased one slot of a worker for direct requests until `expires_at_ms`."""

    session_id: str
    #: The API key id that opened it (operators too: every session has an owner).
    owner: str
    worker_id: str
    region: str
    job_type: str
    expires_at_ms: int
    model: str | None = None
    #: Why this worker won (`scheduler.placement.describe_rank`).
    rank: str | None = None


class DirectSessionClosed(Event, frozen=True, tag="session.closed"):
    """The session ended: `closed` (by its owner or an operator), `expired`, `worker_lost` or
    `worker_draining`. The usage is the worker's count; None when the worker could not be asked."""

    session_id: str
    worker_id: str
    reason: str
    #: Who closed it (an API key id), for `closed`; None when the platform ended it.
    closed_by: str | None = None
    requests: int | None = None
    tokens: int | None = None
    errors: int | None = None


SessionEvent = DirectSessionOpened | DirectSessionClosed

# --- Telemetry (stream HEARTBEATS, subject `heartbeats.<region>.<worker_id>`) --------------------


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    region: str
    at_ms: int = msgspec.field(default_factory=now_ms)
    #: The worker's own interval, so the scheduler knows when three have been missed.
    interval_s: float = 30.0
    max_concurrency: int = 1
    in_flight: tuple[str, ...] = ()
    loaded_models: tuple[str, ...] = ()
    gpus: tuple[GpuInfo, ...] = ()
    memory_free_bytes: int | None = None
    jobs_done: int = 0
    draining: bool = False


# --- Connections (core NATS, subject `sched.workers.connection`; not stored) ---------------------


class WorkerConnection(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's NATS connection opened or closed, as nats-server's system advisory says (the gateway
    forwards them, `gateway.bus.advisories`): the scheduler takes a closed connection that is not opened
    again within a heartbeat interval for the worker's loss, without waiting for three missed heartbeats."""

    worker_id: str
    connected: bool
    #: The server and its client id: one connection, whatever order advisories of two servers arrive in.
    server_id: str
    client_id: int
    #: When the server saw it (its clock, microseconds since the epoch), and why a connection closed.
    at_us: int
    reason: str = ""


# --- Dispatch (stream DISPATCH, subject `dispatch.<region>.<worker_id>`) -------------------------


class Assignment(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="assign"):
    job_id: str
    attempt: int
    job_type: str
    model: str | None
    params: dict[str, Any]
    timeout_s: float


class CancelOrder(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="cancel"):
    job_id: str
    attempt: int


Dispatch = Assignment | CancelOrder

# --- Codecs, built once ----------------------------------------------------------------------------

encoder = msgspec.json.Encoder()
job_event_decoder = msgspec.json.Decoder(JobEvent)
worker_event_decoder = msgspec.json.Decoder(WorkerEvent)
heartbeat_decoder = msgspec.json.Decoder(Heartbeat)
worker_connection_decoder = msgspec.json.Decoder(WorkerConnection)
dispatch_decoder = msgspec.json.Decoder(Dispatch)
session_event_decoder = msgspec.json.Decoder(SessionEvent)


def event_type(event: Event) -> str:
    """The tag of an event, as written to the `Event-Type` header."""
    return type(event).__struct_config__.tag  # type: ignore[return-value]
