"""Workers' runtime configuration in the KV bucket `worker-config`: platform defaults and per-worker
overrides, merged by `sdk.worker_config`; a worker watches its key and applies changes live.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from gateway.workers import last_worker_event
from sdk import subjects
from sdk.api import WorkerConfigView
from sdk.errors import Conflict, WorkerNotFound
from sdk.events import encoder
from sdk.worker_config import effective_config, merge_partial, parse_partial

logger = logging.getLogger(__name__)


class WorkerConfigs:
    """The gateway's worker config commands and queries (a part of `gateway.service.Gateway`)."""

    js: JetStreamContext
    #: The `worker-config` bucket, opened at start.
    config_kv: KeyValue

    async def get_config(self, worker_id: str) -> WorkerConfigView:
        if await last_worker_event(self.js, worker_id) is None:
            raise WorkerNotFound(f"worker {worker_id} not found")
        defaults, _ = await self._kv_get(subjects.WORKER_CONFIG_DEFAULTS_KEY)
        overrides, revision = await self._kv_get(worker_id)
        return WorkerConfigView(
            worker_id=worker_id, effective=effective_config(defaults, overrides), overrides=overrides, revision=revision
        )

    async def set_config(self, worker_id: str, changes: dict[str, Any]) -> WorkerConfigView:
        """Merge `changes` into the worker's overrides; refused whole (nothing written) if any value is bad."""
        if await last_worker_event(self.js, worker_id) is None:
            raise WorkerNotFound(f"worker {worker_id} not found")
        for _ in range(5):
            defaults, _ = await self._kv_get(subjects.WORKER_CONFIG_DEFAULTS_KEY)
            overrides, revision = await self._kv_get(worker_id)
            merged = merge_partial(overrides, changes)
            effective = effective_config(defaults, merged)  # raises BadRequest naming the key
            try:
                if revision:
                    revision = await self.config_kv.update(worker_id, encoder.encode(merged), last=revision)
                else:
                    revision = await self.config_kv.create(worker_id, encoder.encode(merged))
            except KeyWrongLastSequenceError:
                continue
            logger.info("worker %s config changed: %s", worker_id, sorted(changes))
            return WorkerConfigView(worker_id=worker_id, effective=effective, overrides=merged, revision=revision)
        raise Conflict(f"config of worker {worker_id} kept changing")

    async def get_defaults(self) -> dict[str, Any]:
        defaults, _ = await self._kv_get(subjects.WORKER_CONFIG_DEFAULTS_KEY)
        return msgspec.to_builtins(effective_config(defaults, None))

    async def set_defaults(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge `changes` into the platform-wide defaults every worker inherits."""
        defaults, revision = await self._kv_get(subjects.WORKER_CONFIG_DEFAULTS_KEY)
        merged = merge_partial(defaults, changes)
        effective = effective_config(merged, None)  # raises BadRequest naming the key
        await self.config_kv.put(subjects.WORKER_CONFIG_DEFAULTS_KEY, encoder.encode(merged))
        logger.info("worker config defaults changed: %s", sorted(changes))
        return msgspec.to_builtins(effective)

    async def _kv_get(self, key: str) -> tuple[dict[str, Any], int]:
        try:
            entry = await self.config_kv.get(key)
        except KeyNotFoundError:
            return {}, 0
        return parse_partial(entry.value), entry.revision or 0
