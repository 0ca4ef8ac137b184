"""The model cache: loaded models stay warm between jobs, and room is made before a load, not after.

Before loading, the cache compares the engine's estimate with the memory free where models live (the
GPU torch uses, else host RAM), capped by `limit_bytes`, and evicts idle models, least recently
used first. A model a running job uses is never evicted: a load that needs its memory waits until it
is released, and a load that would not fit even with every other model gone fails at once with
`InsufficientGpuMemory`. Concurrent acquires of one model share one load. A model whose size is unknown
until it is downloaded loads alone, so two of them never run out of memory together.

Free GPU memory is torch's view: what the driver has free plus what torch holds cached but unused (NVML
counts that cache as used). NVML serves telemetry only. On a GPU that cannot be measured, loads fail
rather than run unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib.util
import itertools
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import msgspec

from sdk.errors import InsufficientGpuMemory
from sdk.events import now_ms
from worker.config import ConfigError
from worker.engines.base import BaseEngine, EngineError, ModelSpec
from worker.telemetry import gpu_snapshot, memory_free_bytes

logger = logging.getLogger(__name__)

#: One cached model: its engine's job type, its name and its settings (a dtype is another model).
Key = tuple[str, str, bytes]


class LoadStage(enum.StrEnum):
    #: Room depends on models that running jobs still use.
    WAITING_FOR_MEMORY = "waiting_for_memory"
    #: Idle models are being unloaded to make room.
    EVICTING = "evicting"
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class LoadedModel(NamedTuple):
    model: str
    memory_bytes: int
    last_used_at_ms: int


class ModelProvider(Protocol):
    """Lends loaded models to jobs for their length, and says what is loaded; `ModelCache` is one."""

    def use(self, engine: BaseEngine, spec: ModelSpec) -> contextlib.AbstractAsyncContextManager[Any]: ...

    def loaded(self) -> list[LoadedModel]: ...


class MemoryProbe:
    """Free bytes where models load: the GPU torch uses when it can use CUDA, else host RAM."""

    def __init__(self, gpu_indices: list[int] | None = None, *, on_gpu: bool | None = None) -> None:
        #: The GPUs the worker selected (None: all); engines load onto torch's current device among them.
        self.gpu_indices = gpu_indices
        self.on_gpu = _torch_sees_cuda() if on_gpu is None else on_gpu

    def free_bytes(self) -> int | None:
        """None when it cannot be measured."""
        if not self.on_gpu:
            return memory_free_bytes()
        if "torch" in sys.modules and _torch_sees_cuda():
            return _torch_free_bytes()
        # A worker that never imported torch (echo only) loads no models: NVML's figure is only reported,
        # and importing torch here would cost it seconds and a CUDA context.
        gpus = gpu_snapshot(self.gpu_indices[:1] if self.gpu_indices else [0])
        return gpus[0].memory_free_bytes if gpus else None


# --- The decision: pure ------------------------------------------------------------------------


class Resident(msgspec.Struct, frozen=True, kw_only=True):
    key: Key
    memory_bytes: int
    #: The cache's use counter when a job last took or returned it; lower is older.
    last_used: int
    #: In use by a job, or still loading: not evictable.
    busy: bool


class Evict(msgspec.Struct, frozen=True):
    keys: tuple[Key, ...]


class WaitForRelease(msgspec.Struct, frozen=True):
    pass


class NoRoom(msgspec.Struct, frozen=True):
    #: The most that could be free: free now plus every other model's memory.
    free_bytes: int


Room = Evict | WaitForRelease | NoRoom


def make_room(required_bytes: int, free_bytes: int, residents: Sequence[Resident]) -> Room:
    """Which idle models to evict, least recently used first, so `required_bytes` fit."""
    chosen: list[Key] = []
    for resident in sorted((r for r in residents if not r.busy), key=lambda r: r.last_used):
        if free_bytes >= required_bytes:
            break
        chosen.append(resident.key)
        free_bytes += resident.memory_bytes
    if free_bytes >= required_bytes:
        return Evict(tuple(chosen))
    most_free_bytes = free_bytes + sum(r.memory_bytes for r in residents if r.busy)
    return WaitForRelease() if most_free_bytes >= required_bytes else NoRoom(most_free_bytes)


# --- The cache ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    engine: BaseEngine
    spec: ModelSpec
    loading: asyncio.Task[Any] | None = None
    handle: Any = None
    #: Room was made for it: its memory counts against others from then on.
    reserved: bool = False
    loaded: bool = False
    memory_bytes: int = 0
    users: int = 0
    last_used: int = 0
    last_used_at_ms: int = 0


class ModelCache:
    def __init__(
        self,
        probe: MemoryProbe | None = None,
        *,
        limit_bytes: int | None = None,
        on_loaded: Callable[[str, int], Awaitable[None]] | None = None,
        on_unloaded: Callable[[str], Awaitable[None]] | None = None,
        on_load_progress: Callable[[str, LoadStage], None] | None = None,
    ) -> None:
        self.probe = probe or MemoryProbe()
        _check_gpu_selection(self.probe)
        #: The most the cache's models may take together, whatever the device has free.
        self.limit_bytes = limit_bytes
        self.on_loaded = on_loaded
        self.on_unloaded = on_unloaded
        self.on_load_progress = on_load_progress
        self._entries: dict[Key, _Entry] = {}
        self._uses = itertools.count(1)
        #: Set whenever memory may have been given back (a release, a failed load).
        self._released = asyncio.Event()

    @contextlib.asynccontextmanager
    async def use(self, engine: BaseEngine, spec: ModelSpec) -> AsyncIterator[Any]:
        """The loaded model for the duration of a job; it cannot be evicted meanwhile."""
        handle = await self.acquire(engine, spec)
        try:
            # Settings that need no reload (an LLM's batch limits) follow the runtime config live.
            engine.configure(handle, spec.settings)
            yield handle
        finally:
            self.release(engine, spec)

    async def acquire(self, engine: BaseEngine, spec: ModelSpec) -> Any:
        """The model's handle, loading it first if needed; pair it with `release`."""
        key = _key(engine, spec)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(engine=engine, spec=spec)
            entry.loading = asyncio.create_task(self._load(key, entry))
        entry.users += 1
        self._touch(entry)
        try:
            # Shielded: one caller giving up must not cancel a load others wait for.
            return await asyncio.shield(entry.loading)
        except BaseException:
            entry.users -= 1
            raise

    def release(self, engine: BaseEngine, spec: ModelSpec) -> None:
        entry = self._entries[_key(engine, spec)]
        entry.users -= 1
        self._touch(entry)
        self._released.set()

    def loaded(self) -> list[LoadedModel]:
        return [
            LoadedModel(e.spec.name, e.memory_bytes, e.last_used_at_ms) for e in self._entries.values() if e.loaded
        ]

    async def clear(self) -> None:
        """Unload every model no job uses (at shutdown)."""
        idle = [key for key, entry in self._entries.items() if entry.loaded and entry.users == 0]
        for key in idle:
            await self._unload(self._entries.pop(key))

    async def _load(self, key: Key, entry: _Entry) -> Any:
        model = entry.spec.name
        try:
            entry.memory_bytes = await asyncio.to_thread(entry.engine.memory_required, entry.spec)
            await self._make_room(key, entry)
            self._progress(model, LoadStage.LOADING)
            handle = await asyncio.to_thread(entry.engine.load_model, entry.spec)
            if entry.memory_bytes == 0:
                # A hub model unknown before the load is in the HF cache now: measure it there.
                entry.memory_bytes = await asyncio.to_thread(entry.engine.memory_required, entry.spec)
        except (EngineError, InsufficientGpuMemory, asyncio.CancelledError):
            self._forget(key)
            await asyncio.to_thread(entry.engine.release_memory)
            raise
        except Exception as exc:
            failure = EngineError("model_load_failed", f"{model} failed to load: {exc}")
        else:
            entry.handle, entry.loaded = handle, True
            failure = None
        if failure is not None:
            # Raised outside the handler, so no chained traceback keeps the half-loaded tensors alive
            # while the engine gives their memory back.
            self._forget(key)
            logger.warning("%s", failure.message)
            await asyncio.to_thread(entry.engine.release_memory)
            raise failure
        self._released.set()  # a load that waited for this one's size may decide now
        logger.info("loaded %s (%d bytes)", model, entry.memory_bytes)
        self._progress(model, LoadStage.LOADED)
        await _report(self.on_loaded, model, entry.memory_bytes)
        return handle

    async def _make_room(self, key: Key, entry: _Entry) -> None:
        # Each decision and its effect (popping the victims) happen in one step of the event loop,
        # so concurrent loads never decide on the same memory.
        while True:
            # Loads still waiting for room hold none; counting them could make two wait for each other.
            others = [(k, e) for k, e in self._entries.items() if k != key and e.reserved]
            loading = [e for _, e in others if not e.loaded]
            if loading and (entry.memory_bytes == 0 or any(e.memory_bytes == 0 for e in loading)):
                # A size unknown until the download ends: that load runs alone.
                self._progress(entry.spec.name, LoadStage.WAITING_FOR_MEMORY)
                self._released.clear()
                await self._released.wait()
                continue
            residents = [
                Resident(key=k, memory_bytes=e.memory_bytes, last_used=e.last_used, busy=e.users > 0 or not e.loaded)
                for k, e in others
            ]
            match make_room(entry.memory_bytes, self._free_bytes(others), residents):
                case Evict(keys=keys):
                    victims = [self._entries.pop(k) for k in keys]
                    entry.reserved = True
                    break
                case WaitForRelease():
                    self._progress(entry.spec.name, LoadStage.WAITING_FOR_MEMORY)
                    self._released.clear()
                    await self._released.wait()
                case NoRoom(free_bytes=free_bytes):
                    raise InsufficientGpuMemory(
                        f"{entry.spec.name} needs {entry.memory_bytes} bytes; at most {free_bytes} can be freed",
                        {"required_bytes": entry.memory_bytes, "free_bytes": free_bytes, "model": entry.spec.name},
                    )
        if victims:
            self._progress(entry.spec.name, LoadStage.EVICTING)
        for victim in victims:
            await self._unload(victim)

    def _free_bytes(self, others: list[tuple[Key, _Entry]]) -> int:
        measured = self.probe.free_bytes()
        if measured is None and self.probe.on_gpu:
            raise EngineError("gpu_unavailable", "the GPU's free memory cannot be measured: torch sees no CUDA device")
        # Models still loading have reserved memory the device does not show as used yet.
        pending = sum(e.memory_bytes for _, e in others if not e.loaded)
        free = sys.maxsize if measured is None else measured - pending
        if self.limit_bytes is not None:
            free = min(free, self.limit_bytes - sum(e.memory_bytes for _, e in others))
        return free

    async def _unload(self, entry: _Entry) -> None:
        model = entry.spec.name
        try:
            await asyncio.to_thread(entry.engine.unload_model, entry.handle)
        except Exception:
            logger.exception("unloading %s failed; its memory may not be back", model)
        logger.info("unloaded %s", model)
        await _report(self.on_unloaded, model)

    def _forget(self, key: Key) -> None:
        # A failed load leaves nothing behind: the next acquire tries afresh, others may use the room.
        entry = self._entries.pop(key)
        self._released.set()
        self._progress(entry.spec.name, LoadStage.FAILED)

    def _touch(self, entry: _Entry) -> None:
        entry.last_used, entry.last_used_at_ms = next(self._uses), now_ms()

    def _progress(self, model: str, stage: LoadStage) -> None:
        if self.on_load_progress is not None:
            self.on_load_progress(model, stage)


def _key(engine: BaseEngine, spec: ModelSpec) -> Key:
    # Only the settings a load depends on: the batch limits change live on the loaded model.
    loading = msgspec.structs.replace(spec.settings, max_batch_size=0, max_batch_tokens=0)
    return (engine.job_type, spec.name, msgspec.json.encode(loading))


async def _report(callback: Callable[..., Awaitable[None]] | None, *args: Any) -> None:
    # A report that cannot be sent must not fail the load or the job; the heartbeat lists models too.
    if callback is None:
        return
    try:
        await callback(*args)
    except Exception:
        logger.exception("reporting %s failed", args[0])


def _check_gpu_selection(probe: MemoryProbe) -> None:
    """Models load onto one GPU: a worker given several, or given GPUs torch cannot see (an index past the
    last GPU, no driver), does not start rather than run its models on the CPU in float32."""
    if probe.gpu_indices and len(probe.gpu_indices) > 1 and probe.on_gpu:
        raise ConfigError(
            f"gpus {probe.gpu_indices}: a worker that loads models uses one GPU; run one worker per GPU"
        )
    if probe.gpu_indices and not probe.on_gpu and _torch_importable():
        listed = len(gpu_snapshot())
        driver = f"the driver lists {listed} GPU(s), indices 0-{listed - 1}" if listed else "NVML finds no NVIDIA driver"
        raise ConfigError(
            f"gpus {probe.gpu_indices}: torch sees none of them ({driver}); models would run on the CPU. "
            "Choose GPUs that exist, or `gpus: all` on a machine without one"
        )


def _torch_free_bytes() -> int:
    import torch

    device = torch.device("cuda", torch.cuda.current_device())
    free, _ = torch.cuda.mem_get_info(device)
    # Memory torch caches for its own reuse is free for a model this process loads.
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _torch_importable() -> bool:
    return importlib.util.find_spec("torch") is not None


def _torch_sees_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
