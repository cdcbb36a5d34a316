"""A local Ray cluster with logical GPUs and a Serve app, for benchmarks (not a test fixture)."""

from __future__ import annotations

import socket
import tempfile
import time
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(args: dict[str, Any], *, num_gpus: int = 2, proxy: str = "haproxy") -> str:
    """Start Ray (with `proxy` in front, as `make run` does) and deploy the app with `args`;
    return the base URL once /health answers."""

    from serve_app.cluster import proxy as proxies

    temp_dir = tempfile.mkdtemp(prefix="gpu-serve-bench-")
    choice = proxies.choose(proxy)
    proxies.apply(choice)
    print(choice.message, flush=True)
    import ray
    from ray import serve

    from serve_app.app import applications

    ray.init(num_gpus=num_gpus, include_dashboard=False, _temp_dir=temp_dir, logging_level="ERROR", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    for app in applications(args, name="bench"):
        serve.run(**app, blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the app did not become healthy")


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def model(model_id: str, family: str, source: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id, "family": family, "source": source, "num_gpus": 0.25,
        "autoscaling": {"min_replicas": 0, "max_replicas": 1, "metrics_interval_s": 0.5, "look_back_period_s": 2},
        **extra,
    }
