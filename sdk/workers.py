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

from sdk.errors import InvalidTransition
from sdk.events import (
    GpuInfo,
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
