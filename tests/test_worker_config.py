"""The worker's local config: defaults < config.yaml < GPU_WORKER_* variables < flags, and clear errors."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from worker.config import ConfigError, LocalConfig, default_config_path, host_name, load_config, save_config


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment of the test's own: no GPU_WORKER_* or NATS_URL from the machine running it."""
    return {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg-config")}


def write_yaml(env: dict[str, str], text: str) -> Path:
    path = default_config_path(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_without_file_or_variables(env: dict[str, str], tmp_path: Path) -> None:
    config = load_config(env=env)
    assert config.nats_url == "nats://127.0.0.1:4222"
    assert config.name == host_name()
    assert config.region == "default"
    assert config.state_dir == tmp_path / "home" / ".local" / "state" / "gpu-worker"
    assert config.credentials_file == config.state_dir / "credentials.json"
    assert config.gpus == "all" and config.gpu_indices is None
    assert config.memory.limit_bytes is None
    assert config.log_level == "info"


def test_default_file_lives_in_the_xdg_config_dir(env: dict[str, str], tmp_path: Path) -> None:
    assert default_config_path(env) == tmp_path / "xdg-config" / "gpu-worker" / "config.yaml"
    without_xdg = {"HOME": env["HOME"]}
    assert default_config_path(without_xdg) == tmp_path / "home" / ".config" / "gpu-worker" / "config.yaml"


def test_yaml_overrides_defaults(env: dict[str, str]) -> None:
    write_yaml(env, "region: eu\nname: rig-1\ngpus: [0, 2]\nmemory:\n  limit_bytes: 1000\n")
    config = load_config(env=env)
    assert (config.region, config.name, config.gpu_indices, config.memory.limit_bytes) == ("eu", "rig-1", [0, 2], 1000)
    assert config.nats_url == "nats://127.0.0.1:4222"  # untouched by the file: still the default


def test_environment_overrides_yaml_key_by_key(env: dict[str, str]) -> None:
    write_yaml(env, "region: eu\nname: rig-1\nmemory:\n  limit_bytes: 1000\ntls:\n  verify: false\n")
    env |= {
        "GPU_WORKER_REGION": "us",
        "GPU_WORKER_MEMORY__LIMIT_BYTES": "2000",
        "GPU_WORKER_GPUS": "1,3",
        "GPU_WORKER_TLS__ENABLED": "true",
    }
    config = load_config(env=env)
    assert (config.region, config.name) == ("us", "rig-1")
    assert config.memory.limit_bytes == 2000
    assert config.gpu_indices == [1, 3]
    # Nested sections merge: the variable sets `enabled`, the file's `verify` stays.
    assert (config.tls.enabled, config.tls.verify) == (True, False)


def test_flags_override_environment(env: dict[str, str], tmp_path: Path) -> None:
    env |= {"GPU_WORKER_REGION": "us", "GPU_WORKER_NAME": "from-env"}
    config = load_config(env=env, overrides={"region": "ap", "name": None, "state_dir": str(tmp_path / "state")})
    assert (config.region, config.name, config.state_dir) == ("ap", "from-env", tmp_path / "state")


def test_empty_variable_unsets_an_optional_value(env: dict[str, str]) -> None:
    write_yaml(env, "memory:\n  limit_bytes: 1000\n")
    assert load_config(env=env | {"GPU_WORKER_MEMORY__LIMIT_BYTES": ""}).memory.limit_bytes is None


def test_nats_url_defaults_to_the_platform_variable(env: dict[str, str]) -> None:
    env |= {"NATS_URL": "nats://broker:4222"}
    assert load_config(env=env).nats_url == "nats://broker:4222"
    assert load_config(env=env | {"GPU_WORKER_NATS_URL": "nats://mine:4222"}).nats_url == "nats://mine:4222"


def test_config_file_named_by_variable_or_argument(env: dict[str, str], tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text("region: from-variable\n")
    assert load_config(env=env | {"GPU_WORKER_CONFIG": str(elsewhere)}).region == "from-variable"
    argument = tmp_path / "argument.yaml"
    argument.write_text("region: from-argument\n")
    assert load_config(argument, env=env | {"GPU_WORKER_CONFIG": str(elsewhere)}).region == "from-argument"


def test_a_named_config_file_must_exist(env: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path / "missing.yaml", env=env)
    assert raised.value.message == f"config file {tmp_path / 'missing.yaml'} does not exist"


#: A bad setting from each source and the exact message that names it (`{path}`: the config file).
BAD_SETTINGS = {
    "variable: names it and the expectation": (
        None, {"GPU_WORKER_MEMORY__LIMIT_BYTES": "lots"}, {},
        "GPU_WORKER_MEMORY__LIMIT_BYTES: expected `int | null`, got 'lots'",
    ),
    "variable: names the rule": (
        None, {"GPU_WORKER_REGION": "eu west"}, {},
        "GPU_WORKER_REGION: expected `str` matching regex '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$' (got 'eu west')",
    ),
    "variable: lists the valid choices": (
        None, {"GPU_WORKER_LOG_LEVEL": "loud"}, {},
        "GPU_WORKER_LOG_LEVEL: invalid enum value 'loud'; valid values: 'debug', 'error', 'info', 'warning'",
    ),
    "variable: a section needs a key": (
        None, {"GPU_WORKER_MEMORY": "5"}, {},
        "GPU_WORKER_MEMORY is a section; set one of its keys, e.g. GPU_WORKER_MEMORY__...",
    ),
    "file: names the file and the key": (
        "drain_timeout_s: -5\n", {}, {}, "{path}: drain_timeout_s: expected `float` >= 0.0 (got -5)",
    ),
    "file: a secret value is not echoed": (
        "enrollment_token: 12345\n", {}, {}, "{path}: enrollment_token: expected `str | null`, got a hidden value",
    ),
    "file: an unknown key lists the valid keys": (
        "regoin: eu\n", {}, {},
        "{path}: unknown key `regoin`; valid keys: nats_url, name, region, state_dir, credentials_path, "
        "enrollment_token, gpus, log_level, drain_timeout_s, metrics_port, metrics_host, memory, tls",
    ),
    "file: an unknown nested key lists the section's keys": (
        "memory:\n  limit: 5\n", {}, {}, "{path}: unknown key `memory.limit`; valid keys: memory.limit_bytes",
    ),
    "file: not a mapping": ("- region\n- eu\n", {}, {}, "{path}: expected a mapping of settings at the top, got list"),
    "flag: names the flag": (
        None, {}, {"name": "my rig"},
        "--name: expected `str` matching regex '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$' (got 'my rig')",
    ),
}


@pytest.mark.parametrize(("yaml", "variables", "flags", "message"), BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_a_bad_setting_is_refused_with_a_message_that_names_it(
    env: dict[str, str], yaml: str | None, variables: dict[str, str], flags: dict[str, str], message: str
) -> None:
    path = write_yaml(env, yaml) if yaml is not None else None
    with pytest.raises(ConfigError) as raised:
        load_config(env=env | variables, overrides=flags)
    assert raised.value.message == message.replace("{path}", str(path))


def test_unknown_variable_is_refused_with_the_valid_names(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(env=env | {"GPU_WORKER_REGOIN": "eu"})
    message = raised.value.message
    assert message.startswith("GPU_WORKER_REGOIN: unknown setting; valid variables: GPU_WORKER_NATS_URL, ")
    assert "GPU_WORKER_MEMORY__LIMIT_BYTES" in message and "GPU_WORKER_TLS__VERIFY" in message


def test_saved_config_is_private_and_loads_back_equal(env: dict[str, str], tmp_path: Path) -> None:
    config = load_config(
        env=env | {"GPU_WORKER_REGION": "eu", "GPU_WORKER_GPUS": "0", "GPU_WORKER_ENROLLMENT_TOKEN": "secret"}
    )
    path = tmp_path / "saved" / "config.yaml"
    save_config(config, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again: LocalConfig = load_config(path, env=env)
    assert again == config
