"""The KubeRay manifests: generated where they repeat serve_config.yaml, validated everywhere.

Base + overlay are rendered in Python (tests/unit/kustomize.py) and then checked: KubeRay objects
against the CRDs vendored in k8s/crds/ (unknown fields refused, as the API server's strict field
validation does), core objects with kubernetes-validate's schemas (pod templates inside the
RayService too), serveConfigV2 with Ray's own ServeDeploySchema and the project's config.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from serve_app import k8s
from serve_app.cluster import proxy
from serve_app.config import GiB, parse_app_config
from tests.unit import kustomize

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAY = K8S / "overlays" / "production"
CRDS = {"RayService": K8S / "crds" / "ray.io_rayservices.yaml", "RayCluster": K8S / "crds" / "ray.io_rayclusters.yaml"}
SECRET = "gpu-serve-api-keys"


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return kustomize.render(OVERLAY)


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _cluster(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(docs, "RayService")["spec"]["rayClusterConfig"]


def _serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(_one(docs, "RayService")["spec"]["serveConfigV2"])


def _gpu_group(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (group,) = _cluster(docs)["workerGroupSpecs"]
    return group


def _containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cluster = _cluster(docs)
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for t in templates for c in t["spec"]["containers"]]


# --- generated serveConfigV2 ----------------------------------------------------------------


def test_committed_manifest_is_what_make_k8s_generates() -> None:
    committed = (K8S / "base" / "rayservice.yaml").read_text()
    assert k8s.generate(REPO / "serve_config.yaml", K8S / "base" / "rayservice.yaml") == committed, (
        "k8s/base/rayservice.yaml is stale: run make k8s"
    )


def _diff(a: Any, b: Any, path: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return {p for k in set(a) | set(b) for p in _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}")}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return {p for i, (x, y) in enumerate(zip(a, b, strict=True)) for p in _diff(x, y, f"{path}[{i}]")}
    return set() if a == b else {path}


def test_serve_config_v2_differs_from_serve_config_only_where_a_cluster_needs(rendered: list) -> None:
    from serve_app.app import split_serve_config

    # Split into the applications `python -m serve_app run` deploys (the split is tested in
    # tests/unit/test_routed.py); past that, the same as the local file.
    local = split_serve_config(yaml.safe_load((REPO / "serve_config.yaml").read_text()))
    cluster = _serve_config(rendered)
    expected = {".proxy_location", ".http_options.host"} | {
        f".applications[{i}].runtime_env" for i in range(len(local["applications"]))
    }
    diff = _diff(local, cluster)
    # /mcp's Host check learns the Serve service's names (the path depends on what the local file sets).
    mcp = {d for d in diff if re.fullmatch(r"\.applications\[\d+\]\.args\.http", d)}
    hosts = [app["args"]["http"]["mcp_allowed_hosts"] for app in cluster["applications"]]
    assert len(mcp) == len(hosts) and all(h in each for each in hosts for h in k8s.SERVE_SERVICE_HOSTS)
    assert diff - mcp == expected
    assert cluster["proxy_location"] == "EveryNode" and cluster["http_options"]["host"] == "0.0.0.0"
    for app in cluster["applications"]:
        assert app["runtime_env"] == {"env_vars": {"HF_HOME": k8s.HF_HOME}}


def test_splice_replaces_the_block_and_keeps_the_rest() -> None:
    manifest = "a: 1\nspec:\n  # kept\n  serveConfigV2: |\n    old: 1\n\n    older: 2\n  after: 3\nend: 4\n"
    out = k8s.splice_serve_config(manifest, "new: 1\nlist:\n- x\n")
    assert out == "a: 1\nspec:\n  # kept\n  serveConfigV2: |\n    new: 1\n    list:\n    - x\n  after: 3\nend: 4\n"
    assert yaml.safe_load(out)["spec"]["serveConfigV2"] == "new: 1\nlist:\n- x\n"
    with pytest.raises(ValueError, match="serveConfigV2"):
        k8s.splice_serve_config("a: 1\n", "b: 2\n")


def test_check_fails_on_a_stale_manifest_and_make_k8s_fixes_it(tmp_path: Path) -> None:
    manifest = tmp_path / "rayservice.yaml"
    manifest.write_text((K8S / "base" / "rayservice.yaml").read_text())
    local = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    local["applications"][0]["args"]["models"][0]["idle_timeout_s"] = 42
    serve_config = tmp_path / "serve_config.yaml"
    serve_config.write_text(yaml.safe_dump(local, sort_keys=False))
    args = ["--serve-config", str(serve_config), "--manifest", str(manifest)]
    before = manifest.read_text()
    assert k8s.main(["--check", *args]) == 1
    assert manifest.read_text() == before
    assert k8s.main(args) == 0
    assert "idle_timeout_s: 42" in manifest.read_text()
    assert k8s.main(["--check", *args]) == 0


# --- validation -------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """Refuse fields a schema does not declare, as the API server does for CRDs (pruning)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@functools.cache
def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    # libyaml's loader reads the 1 MB CRDs in about 0.6 s, the pure-Python one in about 5 s.
    crd = yaml.load(CRDS[kind].read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def test_kuberay_objects_validate_against_the_vendored_crds(rendered: list) -> None:
    kuberay = [d for d in rendered if d["apiVersion"].startswith("ray.io/")]
    assert [d["kind"] for d in kuberay] == ["RayService"]
    for doc in kuberay:
        _crd_validator(doc["kind"]).validate(doc)
    # The RayCluster that KubeRay creates from the RayService's rayClusterConfig.
    metadata = _one(rendered, "RayService")["metadata"]
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": metadata, "spec": _cluster(rendered)}
    _crd_validator("RayCluster").validate(cluster)


def test_the_crd_check_refuses_a_misspelt_field(rendered: list) -> None:
    doc = copy.deepcopy(_one(rendered, "RayService"))
    doc["spec"]["rayClusterConfig"]["autoscalerOptions"]["idleTimeoutSecond"] = 60
    with pytest.raises(jsonschema.ValidationError, match="idleTimeoutSecond"):
        _crd_validator("RayService").validate(doc)


def test_core_objects_validate_with_kubernetes_validate(rendered: list) -> None:
    version = latest_version()
    core = [d for d in rendered if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in core} == {"Service", "PersistentVolumeClaim"}
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)
    cluster = _cluster(rendered)
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(pod_template, version, strict=True)
    broken = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": {"spec": {"x": 1}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_serve_config_v2_is_a_valid_serve_deploy_config_and_app(rendered: list) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = _serve_config(rendered)
    schema = ServeDeploySchema.model_validate(config)
    assert schema.proxy_location.value == "EveryNode"
    app, *own = config["applications"]
    assert app["import_path"] == "serve_app.app:build_split_app"
    assert {m.id for m in parse_app_config(app["args"]).models} == {"all-MiniLM-L6-v2", "whisper-tiny.en"}
    # Each model's own application, one hop from the proxy (`serve_app/routed.py`).
    assert [(a["route_prefix"], a["import_path"], a["args"]["serve_model"]) for a in own] == [
        ("/models/all-MiniLM-L6-v2", "serve_app.app:build_model_app", "all-MiniLM-L6-v2"),
        ("/models/whisper-tiny.en", "serve_app.app:build_model_app", "whisper-tiny.en"),
    ]


@pytest.mark.parametrize("directory", [K8S / "base", OVERLAY], ids=["base", "production"])
def test_rendering_matches_kubectl_kustomize(directory: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the Python rendering is validated above, unchecked against kustomize")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True, timeout=60)
    theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=lambda d: (d["kind"], d["metadata"]["name"]))
    ours = sorted(kustomize.render(directory), key=lambda d: (d["kind"], d["metadata"]["name"]))
    assert ours == theirs


# --- what the deployment promises -----------------------------------------------------------


def test_gpu_workers_scale_from_zero_on_one_gpu_each(rendered: list) -> None:
    group = _gpu_group(rendered)
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert group["minReplicas"] == 0 and group["replicas"] == 0
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in group["template"]["spec"][
        "tolerations"
    ]
    # Enough nodes for every replica the models may ask for, and none that could stay empty.
    app = parse_app_config(_serve_config(rendered)["applications"][0]["args"])
    gpus_wanted = sum(m.num_gpus * m.autoscaling.max_replicas for m in app.models)
    replicas_wanted = sum(m.autoscaling.max_replicas for m in app.models)
    assert math.ceil(gpus_wanted) <= group["maxReplicas"] <= replicas_wanted
    cluster = _cluster(rendered)
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0


def test_head_has_no_gpus_and_nothing_is_public(rendered: list) -> None:
    cluster = _cluster(rendered)
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert head["serviceType"] == "ClusterIP"
    service = _one(rendered, "RayService")["spec"]
    assert service.get("serveService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    for doc in rendered:
        assert doc["kind"] not in ("Ingress", "Gateway", "HTTPRoute")
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
    for container in _containers(rendered):
        assert all("hostPort" not in p for p in container.get("ports", []))


def test_worker_memory_holds_the_cpu_tier_budget(rendered: list) -> None:
    """The tie: a null budget is half the pod's memory limit (hostmem.host_budget_bytes, which the
    node's probe also calls with the cgroup limit); the other half must hold the rest."""
    (worker,) = _gpu_group(rendered)["template"]["spec"]["containers"]
    assert worker["resources"]["requests"]["memory"] == worker["resources"]["limits"]["memory"]
    assert worker["resources"]["requests"]["cpu"] == worker["resources"]["limits"]["cpu"]
    app = parse_app_config(_serve_config(rendered)["applications"][0]["args"])
    shape = k8s.WorkerShape.from_group(_gpu_group(rendered))
    plan = k8s.memory_plan(app, shape)
    assert plan.budget_bytes == shape.memory_limit_bytes // 2  # serve_config.yaml leaves the budget null
    assert plan.total_bytes <= plan.limit_bytes
    assert k8s.check_manifest((K8S / "base" / "rayservice.yaml").read_text()) == []


def test_the_memory_check_fails_when_they_do_not_fit(rendered: list) -> None:
    app = parse_app_config(_serve_config(rendered)["applications"][0]["args"])
    shape = k8s.WorkerShape.from_group(_gpu_group(rendered))
    small = k8s.WorkerShape(12 * GiB, shape.cpus, shape.gpus, shape.object_store_bytes)
    (problem,) = k8s.worker_fit(app, small)
    assert "memory limit 12.0 GiB" in problem and "host_ram_budget_bytes=None" in problem
    greedy = app.model_copy(update={"router": app.router.model_copy(update={"host_ram_budget_bytes": 20 * GiB})})
    (problem,) = k8s.worker_fit(greedy, shape)
    assert "CPU tier 20.0 GiB" in problem
    (problem,) = k8s.worker_fit(app, k8s.WorkerShape(shape.memory_limit_bytes, 0.5, 1, shape.object_store_bytes))
    assert "0.5 CPUs" in problem


def test_quantities_parse() -> None:
    assert k8s.parse_quantity("24Gi") == 24 * GiB
    assert k8s.parse_quantity("500m") == 0.5
    assert k8s.parse_quantity("6") == 6
    with pytest.raises(ValueError):
        k8s.parse_quantity("lots")


def test_models_volume_holds_the_model_cache(rendered: list) -> None:
    group = _gpu_group(rendered)
    (worker,) = group["template"]["spec"]["containers"]
    (mount,) = [m for m in worker["volumeMounts"] if m["name"] == "models"]
    assert k8s.HF_HOME.startswith(mount["mountPath"].rstrip("/") + "/")
    (volume,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == "models"]
    claim = _one(rendered, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for container in _containers(rendered):
        assert {"name": "HF_HOME", "value": k8s.HF_HOME} in container["env"]


def test_workers_are_ready_through_the_serve_health_endpoint(rendered: list) -> None:
    (worker,) = _gpu_group(rendered)["template"]["spec"]["containers"]
    probe = worker["readinessProbe"]["httpGet"]
    assert probe == {"path": "/-/healthz", "port": _serve_config(rendered)["http_options"]["port"]}


def test_overlay_sets_the_image_and_the_api_keys_from_a_secret(rendered: list) -> None:
    for container in _containers(rendered):
        name, _, tag = container["image"].rpartition(":")
        assert name and tag and name != "gpu-serve", container["image"]
        env = {e["name"]: e for e in container["env"]}
        for var, key in (("GPU_SERVE_API_KEYS", "api-keys"), ("GPU_SERVE_ADMIN_KEYS", "admin-keys")):
            assert "value" not in env[var]
            assert env[var]["valueFrom"] == {"secretKeyRef": {"name": SECRET, "key": key}}
    assert {d["metadata"]["namespace"] for d in rendered} == {"gpu-serve"}


def test_the_base_carries_no_keys() -> None:
    for container in _containers(kustomize.render(K8S / "base")):
        assert not {e["name"] for e in container["env"]} & {"GPU_SERVE_API_KEYS", "GPU_SERVE_ADMIN_KEYS"}


def test_image_versions_match_the_project(rendered: list) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_spec = next(d for d in project if d.startswith("ray[")).split("==")[1]
    torch_pin = next(d for d in project if d.startswith("torch==")).split("==")[1]
    dockerfile = (K8S / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    assert re.fullmatch(ray_spec.replace(".", r"\.").replace("*", r"\d+"), args["RAY_VERSION"])
    assert args["RAY_VERSION"] == _cluster(rendered)["rayVersion"]
    assert args["TORCH_VERSION"] == torch_pin
    assert re.search(r"/whl/cu\d+$", args["TORCH_INDEX"])
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-", dockerfile, re.MULTILINE)
    assert '"ray[serve]==${RAY_VERSION}"' in dockerfile and '".[models]"' in dockerfile


def test_every_node_runs_haproxy_through_the_launcher_and_handles_over_grpc(rendered: list) -> None:
    """HAProxy mode on head and workers alike, started by `gpu-serve-haproxy` (splicing off:
    client aborts reach the replicas), which the image's venv installs with the project."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[proxy.LAUNCHER] == "serve_app.cluster.proxy:launcher_main"
    dockerfile = (K8S / "Dockerfile").read_text()
    venv_bin = re.search(r"^ENV PATH=(\S+):\$PATH", dockerfile, re.MULTILINE)
    assert venv_bin is not None
    for container in _containers(rendered):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env[proxy.ENABLE] == "1", container["name"]
        assert env[proxy.BINARY] == f"{venv_bin.group(1)}/{proxy.LAUNCHER}", container["name"]
        assert env[proxy.GRPC_HANDLES] == "1", container["name"]
