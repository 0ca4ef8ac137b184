"""Runtime configuration of workers: platform defaults merged with per-worker overrides.

The bucket `worker-config` holds `_defaults` (a partial config) and one key per worker id (a partial
config); the effective config is defaults <- `_defaults` <- overrides, merged key by key.
"""

from __future__ import annotations

from typing import Any

import msgspec

from sdk.api import WorkerConfig, convert

#: Settings a layer replaces whole instead of merging key by key. `models` is an allow-list: a layer
#: that names models means exactly those, where a merge would keep every model a lower layer allowed.
REPLACED_WHOLE = frozenset({"models"})


def deep_merge(
    base: dict[str, Any], changes: dict[str, Any], *, replaced_whole: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """`changes` over `base`, nested dicts merged key by key except the top-level keys in `replaced_whole`;
    a `None` value removes the key."""
    out = dict(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key not in replaced_whole:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def merge_partial(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A partial config over another, as every layer of the worker config is merged."""
    return deep_merge(base, changes, replaced_whole=REPLACED_WHOLE)


def effective_config(defaults: dict[str, Any] | None, overrides: dict[str, Any] | None) -> WorkerConfig:
    """The config a worker runs with; raises `BadRequest` naming the bad key."""
    merged = merge_partial(msgspec.to_builtins(WorkerConfig()), defaults or {})
    merged = merge_partial(merged, overrides or {})
    return convert(merged, WorkerConfig)


def parse_partial(data: bytes | None) -> dict[str, Any]:
    return msgspec.json.decode(data) if data else {}
