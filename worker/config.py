"""The worker's local configuration: how to reach the platform, who it is, which GPUs it may use.

Runtime settings (concurrency, heartbeat interval, allowed models) are the platform's and come from
the `worker-config` KV bucket; this is only what a machine owner decides. Precedence, lowest first:
defaults < `config.yaml` < `GPU_WORKER_*` environment variables < command-line flags. Nested keys
use `__` in variable names (`GPU_WORKER_MEMORY__LIMIT_BYTES`). A bad value is refused with a
message that names where it came from and what was expected.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect as mi
import yaml

from sdk.api import Token
from sdk.connection import DEFAULT_NATS_URL
from sdk.errors import BadRequest
from sdk.private_files import write_private
from sdk.tls import client_context

logger = logging.getLogger(__name__)

APP_DIR = "gpu-worker"
ENV_PREFIX = "GPU_WORKER_"
#: Names the config file itself, so it is not a setting (and not refused as an unknown one).
CONFIG_PATH_ENV = "GPU_WORKER_CONFIG"
#: Values never echoed back in error messages.
SECRET_KEYS = frozenset({"enrollment_token", "nats_url"})  # a URL may carry the NATS password


class ConfigError(BadRequest):
    """A local setting is missing its mark; the message names the setting and what was expected."""


class Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class MemoryConfig(Section):
    #: Report at most this many free bytes (a shared machine, or a test without a GPU); None: measure.
    limit_bytes: Annotated[int, msgspec.Meta(ge=0)] | None = None


class TlsConfig(Section):
    #: Connect to NATS over TLS (also implied by a `tls://` URL).
    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Check the server's certificate; turn off only for a test environment.
    verify: bool = True

    def ssl_context(self) -> ssl.SSLContext | None:
        """The context to connect with, or None when TLS is off."""
        if not (self.enabled or self.ca_file or self.cert_file):
            return None
        context = client_context(self.ca_file, verify=self.verify)
        if self.cert_file is not None:
            context.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        return context


class LocalConfig(Section, kw_only=True):
    nats_url: str = DEFAULT_NATS_URL
    #: Shown to operators; defaults to the host name.
    name: Token
    region: Token = "default"
    #: Where the worker keeps its identity between runs (its worker id, its credentials).
    state_dir: Path
    #: Where the credentials from an enrollment are kept; None: `<state_dir>/credentials.json`.
    credentials_path: Path | None = None
    #: One-use token for this worker's first registration (`gpuctl workers enroll`).
    enrollment_token: str | None = None
    #: The GPU indices this worker may use, or "all".
    gpus: list[Annotated[int, msgspec.Meta(ge=0)]] | Literal["all"] = "all"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: How long a stop waits for running jobs before leaving them to the platform to requeue.
    drain_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    #: Serve this process's own metrics (Prometheus text at /metrics) on this port; None: off.
    metrics_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    #: The address the metrics port binds (0.0.0.0 in a container).
    metrics_host: str = "127.0.0.1"
    memory: MemoryConfig = msgspec.field(default_factory=MemoryConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)

    def __post_init__(self) -> None:
        self.state_dir = self.state_dir.expanduser()
        if self.credentials_path is not None:
            self.credentials_path = self.credentials_path.expanduser()

    @property
    def credentials_file(self) -> Path:
        return self.credentials_path or self.state_dir / "credentials.json"

    @property
    def gpu_indices(self) -> list[int] | None:
        """The selected GPU indices, or None for all of them."""
        return None if self.gpus == "all" else list(self.gpus)


# --- Where things live -----------------------------------------------------------------------------


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def _xdg_dir(env: Mapping[str, str], variable: str, fallback: str) -> Path:
    # The XDG spec says a relative value is invalid and must be ignored.
    value = env.get(variable)
    return Path(value) if value and Path(value).is_absolute() else _home(env) / fallback


def _user_dir(env: Mapping[str, str], windows: tuple[str, str], xdg: tuple[str, str]) -> Path:
    """The worker's folder of one kind: `windows` is (variable, fallback under the home) on Windows,
    `xdg` the same on Linux; macOS keeps everything under Application Support."""
    if sys.platform == "win32":
        variable, fallback = windows
        return Path(env.get(variable) or _home(env) / fallback) / APP_DIR
    if sys.platform == "darwin":
        return _home(env) / "Library" / "Application Support" / APP_DIR
    return _xdg_dir(env, *xdg) / APP_DIR


def user_config_dir(env: Mapping[str, str] = os.environ) -> Path:
    """`~/.config/gpu-worker` on Linux (honours XDG_CONFIG_HOME), the platform's own place elsewhere."""
    return _user_dir(env, ("APPDATA", "AppData/Roaming"), ("XDG_CONFIG_HOME", ".config"))


def user_state_dir(env: Mapping[str, str] = os.environ) -> Path:
    """`~/.local/state/gpu-worker` on Linux (honours XDG_STATE_HOME)."""
    return _user_dir(env, ("LOCALAPPDATA", "AppData/Local"), ("XDG_STATE_HOME", ".local/state"))


def default_config_path(env: Mapping[str, str] = os.environ) -> Path:
    return user_config_dir(env) / "config.yaml"


def host_name() -> str:
    """The host name, made into a valid worker name (no dots or spaces, at most 64 characters)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname().split(".")[0]).strip("-_")
    return name[:64] or "worker"


def _defaults(env: Mapping[str, str]) -> dict[str, Any]:
    # Only the values that depend on the machine; the rest are the struct's own defaults.
    return {
        "nats_url": env.get("NATS_URL") or DEFAULT_NATS_URL,
        "name": host_name(),
        "state_dir": str(user_state_dir(env)),
    }


# --- Loading -----------------------------------------------------------------------------------------

#: A setting's path (`("memory", "limit_bytes")`) -> where its value came from, and the value as given.
Sources = dict[tuple[str, ...], tuple[str, Any]]


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, Any] | None = None,
) -> LocalConfig:
    """Defaults < the YAML file < `GPU_WORKER_*` variables < `overrides` (command-line flags, by key).

    `path` defaults to `$GPU_WORKER_CONFIG`, else `<user config dir>/gpu-worker/config.yaml`; a path
    that was named explicitly must exist, the default one may be absent. Raises `ConfigError`.
    """
    explicit = path or (Path(env[CONFIG_PATH_ENV]) if env.get(CONFIG_PATH_ENV) else None)
    file = (explicit or default_config_path(env)).expanduser()
    merged = _defaults(env)
    sources: Sources = {}
    if file.exists():
        _merge(merged, sources, _read_yaml(file), (), lambda key: f"{file}: {key}")
        logger.info("read worker config from %s", file)
    elif explicit is not None:
        raise ConfigError(f"config file {file} does not exist")
    _merge(merged, sources, _read_env(env), (), lambda key: ENV_PREFIX + key.upper().replace(".", "__"))
    if overrides:
        flags = {key: value for key, value in overrides.items() if value is not None}
        _check_keys(flags, LocalConfig, (), lambda key: f"unknown override `{key}`")
        _merge(merged, sources, flags, (), lambda key: f"--{key.replace('_', '-')}")
    return _validate(merged, sources)


def _read_yaml(file: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping of settings at the top, got {type(data).__name__}")
    _check_keys(data, LocalConfig, (), lambda key: f"{file}: unknown key `{key}`")
    return data


def _check_keys(
    data: Mapping[str, Any], struct: type, prefix: tuple[str, ...], what: Callable[[str], str]
) -> None:
    """Refuse keys the struct does not have, naming the valid ones (sections are checked inside)."""
    fields = _fields(struct)
    for key, value in data.items():
        dotted = ".".join((*prefix, str(key)))
        if key not in fields:
            valid = ", ".join(".".join((*prefix, name)) for name in fields)
            raise ConfigError(f"{what(dotted)}; valid keys: {valid}")
        section = _section_type(fields[key])
        if section is not None and isinstance(value, dict):
            _check_keys(value, section, (*prefix, key), what)


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """`GPU_WORKER_MEMORY__LIMIT_BYTES=5` -> `{"memory": {"limit_bytes": "5"}}`; strings are converted
    later by msgspec, lists are comma-separated and an empty value means "unset" (None)."""
    out: dict[str, Any] = {}
    for variable, raw in sorted(env.items()):
        if not variable.startswith(ENV_PREFIX) or variable == CONFIG_PATH_ENV:
            continue
        keys = variable[len(ENV_PREFIX) :].lower().split("__")
        struct: type = LocalConfig
        target = out
        for depth, key in enumerate(keys):
            fields = _fields(struct)
            if key not in fields:
                raise ConfigError(f"{variable}: unknown setting; valid variables: {', '.join(_env_names())}")
            section = _section_type(fields[key])
            if depth == len(keys) - 1:
                if section is not None:
                    raise ConfigError(f"{variable} is a section; set one of its keys, e.g. {variable}__...")
                target[key] = _env_value(fields[key], raw)
            else:
                if section is None:
                    valid = ", ".join(_env_names())
                    raise ConfigError(f"{variable}: `{key}` is not a section; valid variables: {valid}")
                struct = section
                target = target.setdefault(key, {})
    return out


def _env_value(kind: mi.Type, raw: str) -> Any:
    options = kind.types if isinstance(kind, mi.UnionType) else (kind,)
    if raw == "" and any(isinstance(option, mi.NoneType) for option in options):
        return None
    if any(isinstance(option, mi.ListType) for option in options):
        literals = {value for option in options if isinstance(option, mi.LiteralType) for value in option.values}
        if raw not in literals:
            return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def _env_names(struct: type = LocalConfig, prefix: str = ENV_PREFIX) -> list[str]:
    names: list[str] = []
    for name, kind in _fields(struct).items():
        section = _section_type(kind)
        variable = prefix + name.upper()
        names += _env_names(section, variable + "__") if section is not None else [variable]
    return names


def _merge(
    target: dict[str, Any],
    sources: Sources,
    changes: Mapping[str, Any],
    prefix: tuple[str, ...],
    label: Callable[[str], str],
) -> None:
    """Merge `changes` into `target` key by key, remembering where each value came from."""
    for key, value in changes.items():
        path = (*prefix, key)
        sources[path] = (label(".".join(path)), value)
        if isinstance(value, dict):
            if not isinstance(target.get(key), dict):
                target[key] = {}
            _merge(target[key], sources, value, path, label)
        else:
            target[key] = value


def _validate(merged: dict[str, Any], sources: Sources) -> LocalConfig:
    try:
        return msgspec.convert(merged, LocalConfig, strict=False, dec_hook=_decode_path)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), sources)) from None


def _decode_path(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise TypeError(f"Expected a path, got `{type(value).__name__}`")


def _explain(message: str, sources: Sources) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.memory.limit_bytes`" -> "GPU_WORKER_MEMORY__LIMIT_BYTES:
    expected `int`, got 'abc'", naming the setting the way the user wrote it."""
    match = re.match(r"^(?P<what>.*) - at `\$(?P<at>[^`]*)`$", message)
    if match is None:
        return message
    path = tuple(part for part in re.split(r"\.|\[\d+\]", match["at"]) if part)
    what = match["what"][:1].lower() + match["what"][1:]
    kind = _field_type(path)
    if isinstance(kind, mi.LiteralType) or (
        isinstance(kind, mi.UnionType) and any(isinstance(t, mi.LiteralType) for t in kind.types)
    ):
        options = kind.types if isinstance(kind, mi.UnionType) else (kind,)
        valid = [repr(v) for t in options if isinstance(t, mi.LiteralType) for v in t.values]
        what += f"; valid values: {', '.join(valid)}"
    for depth in range(len(path), 0, -1):
        if path[:depth] in sources:
            label, value = sources[path[:depth]]
            shown = "a hidden value" if set(path) & SECRET_KEYS else repr(value)
            if re.search(r", got `[^`]*`", what):
                what = re.sub(r", got `[^`]*`", f", got {shown}", what)
            elif not what.startswith("invalid enum value"):
                what += f" (got {shown})"
            return f"{label}: {what}"
    return f"{'.'.join(path) or 'config'}: {what}"


# --- Type introspection, so messages and env names follow the struct --------------------------------


def _fields(struct: type) -> dict[str, mi.Type]:
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    return {field.name: field.type for field in info.fields}


def _section_type(kind: mi.Type) -> type | None:
    return kind.cls if isinstance(kind, mi.StructType) else None


def _field_type(path: tuple[str, ...]) -> mi.Type | None:
    struct: type | None = LocalConfig
    kind: mi.Type | None = None
    for key in path:
        if struct is None:
            return kind
        kind = _fields(struct).get(key)
        if kind is None:
            return None
        struct = _section_type(kind)
    return kind


# --- Saving --------------------------------------------------------------------------------------------


def save_config(config: LocalConfig, path: Path) -> None:
    """Write `config` as YAML, readable by its owner only (it may hold an enrollment token)."""
    path = path.expanduser()
    text = yaml.safe_dump(msgspec.to_builtins(config, enc_hook=str), sort_keys=False)
    write_private(path, text.encode())
    logger.info("wrote worker config to %s", path)
