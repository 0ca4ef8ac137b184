"""Workers' runtime configuration in the KV bucket `worker-config`: platform defaults and per-worker
overrides, merged by `sdk.worker_config`; a worker watches its key and applies changes live.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from nats.js import JetStreamContext

from gateway.kv import Bucket
from gateway.workers import last_worker_event
from sdk import subjects
from sdk.api import WorkerConfigView
from sdk.errors import WorkerNotFound
from sdk.worker_config import effective_config, merge_partial, parse_partial

logger = logging.getLogger(__name__)


class WorkerConfigs:
    """The gateway's worker config commands and queries (a part of `gateway.service.Gateway`)."""

    js: JetStreamContext
    #: The `worker-config` bucket, opened at start.
    config_bucket: Bucket

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
        defaults, _ = await self._kv_get(subjects.WORKER_CONFIG_DEFAULTS_KEY)

        def merge(overrides: dict[str, Any] | None) -> dict[str, Any]:
            merged = merge_partial(overrides or {}, changes)
            effective_config(defaults, merged)  # raises BadRequest naming the key
            return merged

        changed = await self.config_bucket.update(
            worker_id, parse_partial, merge, what=f"config of worker {worker_id}"
        )
        assert changed is not None
        logger.info("worker %s config changed: %s", worker_id, sorted(changes))
        return WorkerConfigView(
            worker_id=worker_id,
            effective=effective_config(defaults, changed.after),
            overrides=changed.after,
            revision=changed.revision,
        )

    async def get_defaults(self) -> dict[str, Any]:
        defaults, _ = await self._kv_get(subjects.WORKER_CONFIG_DEFAULTS_KEY)
        return msgspec.to_builtins(effective_config(defaults, None))

    async def set_defaults(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Merge `changes` into the platform-wide defaults every worker inherits."""

        def merge(defaults: dict[str, Any] | None) -> dict[str, Any]:
            merged = merge_partial(defaults or {}, changes)
            effective_config(merged, None)  # raises BadRequest naming the key
            return merged

        # Compare-and-set too: two operators changing different defaults at once both keep their change.
        changed = await self.config_bucket.update(
            subjects.WORKER_CONFIG_DEFAULTS_KEY, parse_partial, merge, what="the worker config defaults"
        )
        assert changed is not None
        logger.info("worker config defaults changed: %s", sorted(changes))
        return msgspec.to_builtins(effective_config(changed.after, None))

    async def _kv_get(self, key: str) -> tuple[dict[str, Any], int]:
        loaded = await self.config_bucket.load(key, parse_partial)
        return (loaded.value, loaded.revision) if loaded is not None else ({}, 0)
