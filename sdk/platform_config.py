"""Platform-wide runtime settings in the KV bucket `platform-config`, changed live by operators.

Two keys: `regions` (`sdk.regions.RegionLatencies`, read by the scheduler) and `limits` (`QueueLimits`,
read by the gateway). Each service follows the key it needs with a `SettingWatch`: the current value
at start, then every change at once. A stored value that does not decode (written by hand, or by a newer
version) is logged and ignored: the service keeps the value it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Annotated, Generic, TypeVar

import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from sdk import subjects
from sdk.api import Strict
from sdk.regions import LatencyTable, RegionLatencies
from sdk.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

Count = Annotated[int, msgspec.Meta(ge=0, le=100_000_000)]


class QueueLimits(Strict):
    """Backpressure: past a limit a submission is refused (429 with `Retry-After`) and nothing is
    appended. None means no limit. Queued means waiting for a worker: assigned and running jobs do
    not count."""

    #: Queued jobs over the whole platform.
    max_queued: Count | None = None
    #: Queued jobs of one client (one API key).
    max_queued_per_client: Count | None = None
    #: What a refused client is told to wait before it tries again (whole seconds, as `Retry-After` says it).
    retry_after_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 5


T = TypeVar("T", bound=msgspec.Struct)


class SettingWatch(Generic[T]):
    """Follows one key of `platform-config`; `value` is the setting in effect (`default` while unset)."""

    def __init__(
        self, js: JetStreamContext, key: str, kind: type[T], on_change: Callable[[T], None] | None = None
    ) -> None:
        self._js = js
        self._key = key
        self._kind = kind
        self._on_change = on_change
        self.value: T = kind()
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the current value, then follow the key."""
        kv = await self._js.key_value(subjects.PLATFORM_CONFIG_BUCKET)
        self._watcher = await kv.watch(self._key)
        # The watch first delivers the current value (if any), then None.
        while (entry := await self._watcher.updates(timeout=5.0)) is not None:
            self._apply(entry)
        self._task = asyncio.create_task(self._follow(self._watcher), name=f"setting-{self._key}")

    async def stop(self) -> None:
        """Stop following; idempotent."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
            self._watcher = None

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None:
                self._apply(entry)

    def _apply(self, entry: KeyValue.Entry) -> None:
        try:
            deleted = entry.operation in (KV_DEL, KV_PURGE)
            value = self._kind() if deleted else msgspec.json.decode(entry.value or b"{}", type=self._kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("ignoring invalid %s in %s (keeping the current one): %s",
                           self._key, subjects.PLATFORM_CONFIG_BUCKET, exc)
            return
        self.value = value
        logger.info("%s changed: %s", self._key, msgspec.to_builtins(value))
        if self._on_change is not None:
            self._on_change(value)


class RegionsWatch(SettingWatch[RegionLatencies]):
    """Follows key `regions`; `table` is the latency table placement reads, rebuilt at each change."""

    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js, subjects.REGIONS_KEY, RegionLatencies, on_change=self._rebuild)
        self.table = LatencyTable()

    def _rebuild(self, latencies: RegionLatencies) -> None:
        self.table = LatencyTable(latencies)
