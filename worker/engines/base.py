"""The engine interface: what the worker runtime needs from anything that runs a job type.

The runtime owns concurrency, the model cache and reporting; an engine only knows how to estimate,
load, run and unload. Loading and unloading block (they are called in a thread); `inference` is async
and pushes its own blocking work to a thread, so a streaming engine can emit chunks as they come.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import msgspec

from sdk.api import ModelSettings


class EngineError(Exception):
    """A job failed for a reason the caller should see (bad params, model failed to load, ...)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class DeviceLost(EngineError):
    """The GPU is in an error state that lasts as long as the process (an illegal access, a device-side
    assert): every later job would fail too, so the worker drains and exits and its jobs go elsewhere."""


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True):
    #: A hub id or a local path.
    name: str
    settings: ModelSettings = msgspec.field(default_factory=ModelSettings)


class JobContext:
    """What a running job can do besides returning its result."""

    def __init__(
        self,
        job_id: str,
        attempt: int,
        params: dict[str, Any],
        *,
        emit: Callable[[str], Awaitable[None]] | None = None,
        progress: Callable[[float, str | None], Awaitable[None]] | None = None,
        store_object: Callable[[str, bytes, str], Awaitable[str]] | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.params = params
        #: Set when the platform asks to cancel the job; engines check it between steps.
        self.cancelled = asyncio.Event()
        self._emit = emit
        self._progress = progress
        self._store_object = store_object

    async def emit(self, chunk: str) -> None:
        """Send a piece of streamed output (tokens) to `stream.<job_id>`."""
        if self._emit is not None:
            await self._emit(chunk)

    async def progress(self, fraction: float, message: str | None = None) -> None:
        if self._progress is not None:
            await self._progress(fraction, message)

    async def store_object(self, name: str, data: bytes, content_type: str) -> str:
        """Put a large result in the `results` object store; returns its object name."""
        if self._store_object is None:
            raise RuntimeError("this context has no object store")
        return await self._store_object(name, data, content_type)


class BaseEngine(abc.ABC):
    #: The job type this engine runs (`echo`, `llm`, `image`).
    job_type: ClassVar[str]
    #: Whether jobs of this type name a model that must be loaded first.
    needs_model: ClassVar[bool] = True

    def memory_required(self, spec: ModelSpec) -> int:
        """Estimated bytes the model needs once loaded (weights at the target dtype plus overhead)."""
        return 0

    def load_model(self, spec: ModelSpec) -> Any:
        """Load and return a model handle (blocking; the runtime runs it in a thread)."""
        return None

    def unload_model(self, model: Any) -> None:
        """Release a handle returned by `load_model` (blocking)."""

    def configure(self, model: Any, settings: ModelSettings) -> None:
        """Apply the settings a loaded model follows live (called as each job takes the model)."""

    def release_memory(self) -> None:
        """Give back device memory nothing references any more (after a failed load; blocking)."""

    @abc.abstractmethod
    async def inference(self, model: Any, ctx: JobContext) -> Any:
        """Run one job and return its result (JSON-serialisable); raise `EngineError` to fail it."""
