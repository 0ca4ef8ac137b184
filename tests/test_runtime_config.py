"""Workers' runtime configuration merges layer by layer (`sdk.worker_config`): pure functions, no NATS."""

from __future__ import annotations

import pytest

from sdk.api import LoadControl, ModelSettings, WorkerConfig
from sdk.errors import BadRequest
from sdk.worker_config import effective_config, merge_partial


def test_a_layer_merges_sections_key_by_key_and_none_removes_a_key() -> None:
    base = {"max_concurrency": 2, "load_control": {"acceptance_rate": 0.5}, "heartbeat_interval_s": 5.0}

    merged = merge_partial(base, {"load_control": {}, "heartbeat_interval_s": None, "max_concurrency": 8})

    assert merged == {"max_concurrency": 8, "load_control": {"acceptance_rate": 0.5}}
    assert base["heartbeat_interval_s"] == 5.0, "the base is left untouched"


def test_a_layer_that_names_models_allows_exactly_those() -> None:
    defaults = {"models": {"tiny-llm": {"dtype": "float16"}, "tiny-sd": {}}}

    config = effective_config(defaults, {"models": {"tiny-llm": {"trust_remote_code": True}}})

    assert config.models == {"tiny-llm": ModelSettings(trust_remote_code=True)}


def test_effective_config_layers_overrides_over_defaults_over_the_built_in_values() -> None:
    config = effective_config({"max_concurrency": 2, "load_control": {"acceptance_rate": 0.5}}, {"max_concurrency": 3})

    assert config == WorkerConfig(max_concurrency=3, load_control=LoadControl(acceptance_rate=0.5))


def test_a_bad_value_is_refused_naming_its_key() -> None:
    with pytest.raises(BadRequest, match="acceptance_rate"):
        effective_config(None, {"load_control": {"acceptance_rate": 2}})
