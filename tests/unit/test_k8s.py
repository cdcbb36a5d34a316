"""The KubeRay manifests validate against the RayService CRD schema, and carry a valid app config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.config import parse_app_config

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO.parent / "shared" / "schemas"


def _crd_schema(name: str) -> dict[str, Any]:
    path = SCHEMAS / name
    if not path.exists():
        pytest.skip(f"KubeRay CRD schema not found at {path}")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def _manifest() -> dict[str, Any]:
    return yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text())


def test_rayservice_validates_against_the_crd() -> None:
    import jsonschema

    schema = _crd_schema("ray.io_rayservices.yaml")
    jsonschema.validate(_manifest(), schema)


def test_rayservice_serve_config_is_a_valid_app() -> None:
    serve_config = yaml.safe_load(_manifest()["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "serve_app.app:build_app"
    config = parse_app_config(app["args"])
    assert {m.id for m in config.models} == {"all-MiniLM-L6-v2", "whisper-tiny.en"}


def test_gpu_workers_request_gpus() -> None:
    spec = _manifest()["spec"]["rayClusterConfig"]
    (group,) = spec["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


def test_head_service_stays_inside_the_cluster() -> None:
    """The dashboard listens on 0.0.0.0 inside the pod (KubeRay's probes need it); the service
    in front of it must not be a LoadBalancer or NodePort."""
    head = _manifest()["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
