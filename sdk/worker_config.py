"""Runtime configuration of workers: platform defaults merged with per-worker overrides.

The bucket `worker-config` holds `_defaults` (a partial config) and one key per worker id (a partial
config); the effective config is defaults <- `_defaults` <- overrides, merged key by key.
"""

from __future__ import annotations

from typing import Any

import msgspec

from sdk.api import WorkerConfig, convert


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` over `base`, nested dicts merged key by key; a `None` value removes the key."""
    out = dict(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key != "models":
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def effective_config(defaults: dict[str, Any] | None, overrides: dict[str, Any] | None) -> WorkerConfig:
    """The config a worker runs with; raises `BadRequest` naming the bad key."""
    merged = deep_merge(msgspec.to_builtins(WorkerConfig()), defaults or {})
    merged = deep_merge(merged, overrides or {})
    return convert(merged, WorkerConfig)


def parse_partial(data: bytes | None) -> dict[str, Any]:
    return msgspec.json.decode(data) if data else {}
