"""Runtime config keys: the dotted paths `gpu-worker get` and `set` take into `sdk.api.WorkerConfig`.

`max_concurrency`, `load_control.acceptance_rate`, `models.<model>.dtype`: a key names a leaf or a section
of the runtime config the worker follows (`worker.config_watch`). A model's name is one part of the path
even when it holds dots or slashes (`models.Qwen/Qwen2.5-0.5B.dtype`). A key or value the config would
not take is refused with `BadRequest`, naming the key, the value, what was expected and the valid keys.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import msgspec
import msgspec.inspect as mi

from sdk.api import WorkerConfig
from sdk.errors import BadRequest

#: Where a model's name goes in the list of valid runtime config keys.
MODEL_PLACEHOLDER = "<model>"


class Setting(NamedTuple):
    """A dotted key resolved against WorkerConfig; a model's name is one part of the path."""

    path: tuple[str, ...]
    #: The type of the container each part is looked up in (WorkerConfig first).
    parents: tuple[mi.Type, ...]
    #: The type of the value the key names.
    kind: mi.Type


def config_keys(kind: mi.StructType | None = None, prefix: str = "") -> list[str]:
    """Every settable leaf key: `max_concurrency`, ..., `models.<model>.dtype`."""
    keys: list[str] = []
    for field in _fields(WorkerConfig) if kind is None else kind.fields:
        match field.type:
            case mi.StructType():
                keys += config_keys(field.type, f"{prefix}{field.name}.")
            case mi.DictType(value_type=mi.StructType() as value):
                keys += config_keys(value, f"{prefix}{field.name}.{MODEL_PLACEHOLDER}.")
            case _:
                keys.append(prefix + field.name)
    return keys


def resolve_key(key: str) -> Setting:
    """`models.Qwen/Qwen2.5-0.5B.dtype` -> path `("models", "Qwen/Qwen2.5-0.5B", "dtype")`; a section
    (`load_control`, `models.gpt2`) is a key too. Raises BadRequest listing the valid keys."""
    parts = key.split(".")
    path: list[str] = []
    parents: list[mi.Type] = []
    kind: mi.Type = mi.type_info(WorkerConfig)
    while parts:
        match kind:
            case mi.StructType(fields=fields):
                field = next((f for f in fields if f.name == parts[0]), None)
                if field is None:
                    break
                parents.append(kind)
                path.append(parts.pop(0))
                kind = field.type
            case mi.DictType(value_type=value):
                # Model names hold dots (`Qwen2.5`): the last part names a setting only when it is one.
                names_setting = isinstance(value, mi.StructType) and parts[-1] in {f.name for f in value.fields}
                name_parts = parts[:-1] if names_setting and len(parts) > 1 else parts
                parents.append(kind)
                path.append(".".join(name_parts))
                parts = parts[len(name_parts):]
                kind = value
            case _:
                break
    if parts or not all(path):
        valid = config_keys()
        raise BadRequest(f"unknown key `{key}`; valid keys: {', '.join(valid)}", {"key": key, "valid_keys": valid})
    return Setting(tuple(path), tuple(parents), kind)


def parse_value(text: str) -> Any:
    """JSON when it is JSON (`0.8`, `true`, `null`, `{...}`), else the text itself (`float16`)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def check_setting(setting: Setting, value: Any, text: str) -> None:
    """Refuse a value WorkerConfig would not take, naming the key, the value and what was expected.
    None (unset) always passes: the default applies again."""
    if value is None:
        return
    try:
        msgspec.convert(_nest(setting.path, value), WorkerConfig, strict=False)
    except msgspec.ValidationError as exc:
        expected = str(exc).split(" - at `", 1)[0]
        if isinstance(setting.kind, mi.LiteralType):
            expected += f"; valid values: {', '.join(map(str, setting.kind.values))}"
        raise BadRequest(
            f"{'.'.join(setting.path)} = {text}: {expected[:1].lower()}{expected[1:]}; "
            f"valid keys: {', '.join(config_keys())}",
            {"key": ".".join(setting.path), "value": text},
        ) from None


def config_change(setting: Setting, value: Any, effective: WorkerConfig) -> dict[str, Any]:
    """The partial config to send. The platform replaces a dict-valued setting (`models`) whole, so that
    one goes out complete: the effective one with this key changed."""
    top = setting.path[0]
    top_kind = setting.parents[1] if len(setting.path) > 1 else setting.kind
    if isinstance(top_kind, mi.DictType):
        current = msgspec.to_builtins(effective)[top]
        return {top: _replaced(current, setting.path[1:], value)}
    return _nest(setting.path, value)


def lookup(effective: WorkerConfig, setting: Setting) -> Any:
    """The value a key has in `effective`; a model not listed has the default settings (as the runtime
    gives it when any model may run)."""
    data: Any = msgspec.to_builtins(effective)
    for part, parent in zip(setting.path, setting.parents):
        if isinstance(parent, mi.DictType) and part not in data and isinstance(parent.value_type, mi.StructType):
            data = msgspec.to_builtins(parent.value_type.cls())
        else:
            data = data[part]
    return data


def config_rows(effective: WorkerConfig, overrides: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """`(key, value, set for this worker)` for every leaf of the effective config."""
    rows: list[tuple[str, Any, bool]] = []
    dict_valued = {f.name for f in _fields(WorkerConfig) if isinstance(f.type, mi.DictType)}

    def walk(data: dict[str, Any], own: Any, prefix: str, whole: bool | None) -> None:
        for name, value in data.items():
            here = isinstance(own, dict) and name in own
            overridden = here if whole is None else whole
            if isinstance(value, dict) and value:
                # A dict-valued setting (`models`) is replaced whole: all its entries come from one place.
                inner = overridden if not prefix and name in dict_valued else whole
                walk(value, own[name] if here else None, f"{prefix}{name}.", inner)
            else:
                rows.append((prefix + name, value, overridden))

    walk(msgspec.to_builtins(effective), overrides, "", None)
    return rows


def _fields(struct: type) -> tuple[mi.Field, ...]:
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    return info.fields


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    for part in reversed(path[1:]):
        value = {part: value}
    return {path[0]: value}


def _replaced(data: Any, path: tuple[str, ...], value: Any) -> Any:
    """`data` with the value at `path` set, or removed when `value` is None."""
    if not path:
        return value
    out = dict(data) if isinstance(data, dict) else {}
    if value is None and len(path) == 1:
        out.pop(path[0], None)
    else:
        out[path[0]] = _replaced(out.get(path[0]), path[1:], value)
    return out
