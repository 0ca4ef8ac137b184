"""The worker's runtime config: read from the `worker-config` KV bucket and followed while it runs.

The platform holds `_defaults` and one key per worker; the worker runs with their merge
(`sdk.worker_config.effective_config`) and watches both keys, so a change applies at once, without a
restart. An entry that does not parse is logged and ignored: the worker keeps the config it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from sdk import subjects
from sdk.api import WorkerConfig
from sdk.errors import BadRequest
from sdk.tasks import cancel_and_wait
from sdk.worker_config import effective_config, parse_partial
from worker.link import REQUEST_TIMEOUT_S, PlatformLink

logger = logging.getLogger(__name__)


class ConfigWatch:
    """Holds the runtime config in effect (`current`) and calls `on_change` with each new one."""

    def __init__(self, link: PlatformLink, on_change: Callable[[WorkerConfig], None]) -> None:
        self._link = link
        self._on_change = on_change
        #: The runtime config in effect.
        self.current = WorkerConfig()
        #: The partial configs as last read: `_defaults` and this worker's own key.
        self._partials: dict[str, dict[str, Any]] = {}
        self._watchers: list[KeyValue.KeyWatcher] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Read `_defaults` and this worker's key, then keep watching both."""
        assert self._link.worker_id is not None, "register first"
        kv = await self._link.js.key_value(subjects.WORKER_CONFIG_BUCKET)
        for key in (subjects.WORKER_CONFIG_DEFAULTS_KEY, self._link.worker_id):
            watcher = await kv.watch(key)
            self._watchers.append(watcher)
            # The watch first delivers the current value (if any), then None.
            while (entry := await watcher.updates(timeout=REQUEST_TIMEOUT_S)) is not None:
                self._on_entry(key, entry)
            self._tasks.append(asyncio.create_task(self._follow(key, watcher)))
        logger.info("runtime config: %s", msgspec.to_builtins(self.current))

    async def stop(self) -> None:
        """Stop following; idempotent."""
        await cancel_and_wait(*self._tasks)
        for watcher in self._watchers:
            with contextlib.suppress(Exception):
                await watcher.stop()
        self._watchers.clear()

    async def _follow(self, key: str, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None:
                self._on_entry(key, entry)

    def _on_entry(self, key: str, entry: KeyValue.Entry) -> None:
        deleted = entry.operation in (KV_DEL, KV_PURGE)
        try:
            partial_config = {} if deleted else parse_partial(entry.value)
            if not isinstance(partial_config, dict):
                raise BadRequest(f"expected a JSON object, got {type(partial_config).__name__}")
            partials = {**self._partials, key: partial_config}
            config = effective_config(
                partials.get(subjects.WORKER_CONFIG_DEFAULTS_KEY), partials.get(self._link.worker_id or "")
            )
        except (msgspec.DecodeError, BadRequest) as exc:
            logger.warning("ignoring invalid worker config %r (keeping the current one): %s", key, exc)
            return
        self._partials = partials
        changes = config_changes(self.current, config)
        if not changes:
            return
        self.current = config
        for change in changes:
            logger.info("worker config changed: %s", change)
        self._on_change(config)


def config_changes(old: WorkerConfig, new: WorkerConfig) -> list[str]:
    """`["max_concurrency: 4 -> 8"]`, one line per top-level setting that differs."""
    before, after = msgspec.to_builtins(old), msgspec.to_builtins(new)
    return [f"{key}: {before[key]} -> {after[key]}" for key in after if before.get(key) != after[key]]
