"""Workers: their views, registration and credentials, and their runtime configuration."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec

from sdk.api.decoding import Strict, Token
from sdk.api.jobs import JobType, Moment
from sdk.events import GpuInfo

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
    #: Time travel (`gateway.history`): the fleet as it was at this moment (RFC 3339).
    at_time: Moment | None = None


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
    #: LLM jobs on this model decoded together in one batch; changed live, without a reload.
    max_batch_size: Annotated[int, msgspec.Meta(ge=1, le=256)] = 16
    #: The batch's KV-cache budget in tokens (each job's prompt plus its `max_new_tokens`); the memory
    #: check reserves it when the model loads.
    max_batch_tokens: Annotated[int, msgspec.Meta(ge=64, le=1_048_576)] = 16384


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
    #: The platform's Ed25519 public key (hex) that signs direct-session tokens (`sdk.direct`). Written
    #: into `_defaults` by the gateway, so every worker can check a token offline; not an operator setting.
    session_key: str = ""


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
