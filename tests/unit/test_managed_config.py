"""`family: python` entries: the same validation as the built-ins, and a deploy that fails on a bad
`deployment` path or class, naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.app import build_app
from serve_app.config import ConfigError, parse_app_config

REPO = Path(__file__).resolve().parents[2]


def python_model(**overrides: Any) -> dict[str, Any]:
    return {"id": "mine", "family": "python", "deployment": "examples.byo.models:Codec", **overrides}


def config_error(args: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_app_config(args)
    return str(info.value)


def deploy_error(*models: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        build_app({"models": list(models)})
    return str(info.value)


def test_the_example_config_parses_and_builds() -> None:
    doc = yaml.safe_load((REPO / "examples" / "byo" / "serve_config.yaml").read_text())
    args = doc["applications"][0]["args"]
    config = parse_app_config(args)
    assert [m.id for m in config.models] == ["codec", "lm", "tts", "tts-alternate"]
    alternate = config.model("tts-alternate")
    assert alternate is not None and alternate.alternate and alternate.num_gpus == 0
    assert build_app(args) is not None  # imports every class and binds the graph


def test_an_unimportable_module_fails_the_deploy_naming_the_field() -> None:
    message = deploy_error(python_model(deployment="no_such_package.models:Thing"))
    assert "models[0](id='mine').deployment" in message
    assert "cannot import module 'no_such_package.models'" in message and "'no_such_package.models:Thing'" in message


def test_a_missing_class_fails_the_deploy_naming_the_field() -> None:
    message = deploy_error(python_model(deployment="examples.byo.models:NoSuchClass"))
    assert "models[0](id='mine').deployment" in message and "has no attribute 'NoSuchClass'" in message


@pytest.mark.parametrize(
    ("path", "kind"),
    [("serve_app.config:AppConfig", "class AppConfig"), ("examples.byo.pipeline:wav_bytes", "function")],
)
def test_something_that_is_not_a_managed_model_fails_the_deploy(path: str, kind: str) -> None:
    good = {"id": "ok", "family": "python", "deployment": "examples.byo.models:Codec"}
    message = deploy_error(good, python_model(deployment=path))
    assert "models[1](id='mine').deployment" in message
    assert kind in message and "not a subclass of serve_app.ManagedModel" in message


def test_deployment_is_required_for_python_and_only_for_python() -> None:
    message = config_error({"models": [{"id": "x", "family": "python"}]})
    assert "models[0](id='x')" in message and "family python needs deployment" in message
    builtin = {"id": "e", "family": "sentence-transformers", "source": "hub:o/e", "alternate": True}
    message = config_error({"models": [builtin]})
    assert "are for family python" in message


def test_a_malformed_deployment_path_is_named() -> None:
    message = config_error({"models": [python_model(deployment="just-a-name")]})
    assert "models[0](id='mine').deployment" in message and "'just-a-name'" in message


def test_builtin_families_still_need_a_source_and_a_gpu_share() -> None:
    message = config_error({"models": [{"id": "e", "family": "faster-whisper"}]})
    assert "source is required" in message
    zero = {"id": "e", "family": "faster-whisper", "source": "hub:o/e", "num_gpus": 0}
    message = config_error({"models": [zero]})
    assert "models[0](id='e').num_gpus" in message
    config = parse_app_config({"models": [python_model(num_gpus=0)]})
    assert config.models[0].num_gpus == 0  # a pipeline with no weights of its own needs no GPU share


def test_python_entries_take_the_same_knobs_and_validation() -> None:
    message = config_error({"models": [python_model(idle_timeout_s=-1)]})
    assert "models[0](id='mine').idle_timeout_s" in message
    config = parse_app_config(
        {"models": [python_model(priority=3, pinned=True, idle_timeout_s=0, autoscaling={"max_replicas": 1})]}
    )
    m = config.models[0]
    assert (m.priority, m.pinned, m.idle_timeout_s, m.autoscaling.max_replicas) == (3, True, 0, 1)
