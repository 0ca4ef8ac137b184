"""A worker's lifecycle is a pure function of its events on `workers.<id>`, like a job's (`sdk.jobs`).

The same `apply_worker` runs in the scheduler, the projections and the worker's own CLI, so they never
disagree about what a worker's log means. Telemetry (heartbeats) is not part of it: each reader merges
the latest heartbeat with this state its own way.

Transitions, by the status before the event (None: never registered):
- `WorkerRegistered`: from any status to ONLINE (a worker comes back by registering again);
- every other event needs a registration first;
- `WorkerDraining` and `WorkerLost` are refused for a deregistered worker: it left, it cannot drain or
  get lost any more until it registers again;
- model loads and unloads, deregistration and credential rotation keep or set the status as named.
"""

from __future__ import annotations

import enum
from typing import TypeVar, overload

import msgspec

from sdk.api import ReportDraining, ReportModelLoaded, ReportModelUnloaded, WorkerView, ms_to_datetime
from sdk.errors import InvalidTransition
from sdk.events import (
    GpuInfo,
    Heartbeat,
    WorkerCredentialsRotated,
    WorkerDeregistered,
    WorkerDraining,
    WorkerEvent,
    WorkerLost,
    WorkerModelLoaded,
    WorkerModelUnloaded,
    WorkerRegistered,
)


class WorkerStatus(str, enum.Enum):
    #: Registered and taking work.
    ONLINE = "online"
    #: Finishing its jobs, taking no new ones.
    DRAINING = "draining"
    #: Its heartbeats stopped; the scheduler requeued its jobs.
    LOST = "lost"
    #: Left the platform for good (until it registers again).
    DEREGISTERED = "deregistered"


class WorkerState(msgspec.Struct, kw_only=True):
    """A worker as its events on `workers.<id>` describe it."""

    id: str
    name: str | None = None
    region: str | None = None
    #: None for a worker that never registered (a reader may know it from heartbeats only).
    status: WorkerStatus | None = None
    capabilities: list[str] = []
    #: The models it has loaded, newest last, with the memory each took when it loaded.
    loaded_models: dict[str, int] = {}
    gpus: list[GpuInfo] = []
    #: Time of the last applied event, and its stream sequence (for expected-sequence appends).
    updated_at_ms: int = 0
    seq: int = 0

    @property
    def registered(self) -> bool:
        return self.status is not None


#: A reader's own struct may extend `WorkerState` (a row with telemetry columns); the fold keeps its type.
State = TypeVar("State", bound=WorkerState)


@overload
def apply_worker(state: None, event: WorkerEvent, seq: int = 0) -> WorkerState: ...
@overload
def apply_worker(state: State, event: WorkerEvent, seq: int = 0) -> State: ...
def apply_worker(state: WorkerState | None, event: WorkerEvent, seq: int = 0) -> WorkerState:
    """The worker after `event`; a new struct, `state` is left untouched. Raises `InvalidTransition`."""
    current = state if state is not None else WorkerState(id=event.worker_id)
    if current.status is None and not isinstance(event, WorkerRegistered):
        raise InvalidTransition(f"worker {event.worker_id} is not registered; {type(event).__name__} needs it")
    replace = msgspec.structs.replace
    match event:
        case WorkerRegistered():
            new = replace(
                current,
                name=event.name,
                region=event.region,
                status=WorkerStatus.ONLINE,
                capabilities=list(event.capabilities),
                gpus=list(event.gpus),
            )
        case WorkerModelLoaded():
            # Newest last: a model loaded again moves to the end.
            models = {m: b for m, b in current.loaded_models.items() if m != event.model}
            new = replace(current, loaded_models={**models, event.model: event.memory_bytes})
        case WorkerModelUnloaded():
            new = replace(current, loaded_models={m: b for m, b in current.loaded_models.items() if m != event.model})
        case WorkerDraining() | WorkerLost():
            if current.status is WorkerStatus.DEREGISTERED:
                raise InvalidTransition(
                    f"worker {current.id} is deregistered; {type(event).__name__} needs it registered again",
                    {"status": current.status.value},
                )
            status = WorkerStatus.DRAINING if isinstance(event, WorkerDraining) else WorkerStatus.LOST
            new = replace(current, status=status)
        case WorkerDeregistered():
            new = replace(current, status=WorkerStatus.DEREGISTERED)
        case WorkerCredentialsRotated():
            new = replace(current)  # nothing a reader sees; the state only moves to the new sequence
    new.updated_at_ms = event.at_ms
    new.seq = seq
    return new


# --- What a worker says of itself ----------------------------------------------------------------------

#: What a worker reports about itself (the rest of `sdk.api.WorkerReport` is about its jobs).
SelfReport = ReportModelLoaded | ReportModelUnloaded | ReportDraining


def decide_self_report(worker_id: str, report: SelfReport) -> WorkerEvent:
    """The event a worker's report about itself appends to its subject `workers.<id>`."""
    match report:
        case ReportModelLoaded():
            return WorkerModelLoaded(worker_id=worker_id, model=report.model, memory_bytes=report.memory_bytes)
        case ReportModelUnloaded():
            return WorkerModelUnloaded(worker_id=worker_id, model=report.model)
        case ReportDraining():
            return WorkerDraining(worker_id=worker_id)


def must_register(last: WorkerEvent | None) -> bool:
    """Whether a worker whose newest event is `last` must register (again) before its heartbeats count:
    the platform never heard of it, lost it, or it left."""
    return last is None or isinstance(last, (WorkerLost, WorkerDeregistered))


# --- A reader's worker: the fold plus its latest heartbeat --------------------------------------------


class WorkerRow(WorkerState, kw_only=True):
    """A worker's lifecycle columns, folded from WORKERS by `sdk.workers.apply_worker`, then the columns
    taken from its latest heartbeat. A worker only heard of through heartbeats has no status yet."""

    capacity: int = 1
    last_heartbeat_ms: int | None = None
    heartbeat_models: list[str] = []
    heartbeat_gpus: list[GpuInfo] = []


def apply_heartbeat(worker: WorkerRow | None, heartbeat: Heartbeat) -> WorkerRow:
    """The worker with the telemetry of its latest heartbeat; the lifecycle columns stay as they are."""
    return msgspec.structs.replace(
        worker or WorkerRow(id=heartbeat.worker_id),
        capacity=heartbeat.max_concurrency,
        last_heartbeat_ms=heartbeat.at_ms,
        heartbeat_models=list(heartbeat.loaded_models),
        heartbeat_gpus=list(heartbeat.gpus),
    )


def worker_view(worker: WorkerRow, in_flight: list[str]) -> WorkerView:
    """What readers see: models and GPUs from whichever is fresher, the last event or the last heartbeat."""
    from_heartbeat = worker.last_heartbeat_ms is not None and worker.last_heartbeat_ms >= worker.updated_at_ms
    # Queries return registered workers only, and registration sets all three.
    assert worker.status is not None and worker.name is not None and worker.region is not None
    return WorkerView(
        id=worker.id,
        name=worker.name,
        region=worker.region,
        status=worker.status.value,
        capabilities=worker.capabilities,
        capacity=worker.capacity,
        in_flight=in_flight,
        last_heartbeat=ms_to_datetime(worker.last_heartbeat_ms),
        loaded_models=worker.heartbeat_models if from_heartbeat else list(worker.loaded_models),
        gpus=worker.heartbeat_gpus if from_heartbeat else worker.gpus,
        seq=worker.seq,
    )
