"""`python -m serve_app run`: start (or join) a Ray cluster and serve the configured models.

`python -m serve_app mcp --url http://127.0.0.1:8000`: the MCP tools over stdio, for desktop
clients, forwarding each call to the running service (admin key from GPU_SERVE_ADMIN_KEY).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger("serve_app.launcher")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "serve_config.yaml"


def load_serve_config(path: Path) -> dict[str, Any]:
    with open(path) as fh:
        doc = yaml.safe_load(fh) or {}
    apps = doc.get("applications") or []
    if len(apps) != 1:
        raise SystemExit(f"{path}: expected exactly one application under 'applications', found {len(apps)}")
    return doc


def _say(msg: str) -> None:
    print(msg, flush=True)


def start_ray(logical_gpus: int, logical_cpus: int | None, proxy: str | None = None) -> bool:
    """Join RAY_ADDRESS when set, else start a local cluster. Returns True if we started it."""
    import ray

    from serve_app.cluster.gpu import nvml_gpu_count

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        _say(f"Joined the Ray cluster at {os.environ['RAY_ADDRESS']}.")
        return False
    gpus = nvml_gpu_count()
    kwargs: dict[str, Any] = {}
    if gpus == 0:
        kwargs["num_gpus"] = logical_gpus
        _say(
            f"No NVIDIA GPU found (NVML unavailable): declaring {logical_gpus} logical GPUs with simulated memory, "
            "models run on the CPU."
        )
    if logical_cpus:
        kwargs["num_cpus"] = logical_cpus
    temp_dir = os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="gpu-serve-ray-")
    choose_proxy(proxy)
    ray.init(_temp_dir=temp_dir, **local_ray_options(), **kwargs)
    return True


def choose_proxy(wanted: str | None) -> None:
    """HAProxy in front of the local cluster when one runs, else Serve's proxy (`cluster/proxy.py`).

    An explicit `RAY_SERVE_ENABLE_HA_PROXY=0` in the environment keeps Serve's proxy."""
    from serve_app.cluster import proxy
    from serve_app.config import Settings

    if wanted is None:
        wanted = "serve" if os.environ.get(proxy.ENABLE) == "0" else Settings().proxy
    choice = proxy.choose(wanted)
    proxy.apply(choice)
    _say(choice.message)


def local_ray_options() -> dict[str, Any]:
    """`ray.init` options for a cluster we start. The dashboard stays on loopback: it can stop
    jobs and actors, and the Serve API's keys do not protect it."""
    return {
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "logging_level": logging.WARNING,
        "log_to_driver": os.environ.get("GPU_SERVE_LOG_TO_DRIVER", "1") == "1",
    }


def run(args: argparse.Namespace) -> int:
    from serve_app.config import ConfigError, parse_app_config
    from serve_app.logs import serve_logging_config

    doc = load_serve_config(Path(args.config))
    app_doc = doc["applications"][0]
    try:
        parse_app_config(app_doc.get("args") or {})
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    http = doc.get("http_options") or {}
    host = args.host or http.get("host", "127.0.0.1")
    port = int(args.port or http.get("port", 8000))

    started = start_ray(args.logical_gpus, args.logical_cpus, args.proxy)
    # Serve reads its environment (the proxy mode, the handles' transport) when first imported,
    # so it is imported only once `start_ray` has set it.
    import ray
    from ray import serve

    from serve_app.app import applications

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        _say(f"Received {signal.Signals(signum).name}; shutting down.")
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        serve.start(
            http_options={"host": host, "port": port},
            proxy_location=doc.get("proxy_location", "HeadOnly"),
            logging_config=serve_logging_config(),
        )
        t0 = time.perf_counter()
        apps = applications(
            app_doc.get("args") or {}, name=app_doc.get("name", "gpu-serve"),
            route_prefix=app_doc.get("route_prefix", "/"),
        )
        for app in apps:
            serve.run(**app, blocking=False)
        base = f"http://{host}:{port}"
        ctx = ray.get_runtime_context()
        dashboard = getattr(ctx, "dashboard_url", None) or "127.0.0.1:8265"
        _say(f"Application ready in {time.perf_counter() - t0:.1f}s.")
        _say(f"  API:        {base}/v1  (OpenAI-compatible)")
        for app in apps[:-1]:
            _say(f"  One hop:    {base}{app['route_prefix']}/v1  (the model's replica answers itself)")
        _say(f"  Status:     {base}/gpu/status   Health: {base}/health")
        token = Path.home() / ".ray" / "auth_token"
        _say(f"  Dashboard:  http://{dashboard}  (token auth is on: the token is in {token})")
        _say("Press Ctrl-C to stop.")
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
                _say("Stopped the application and the local Ray cluster.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="serve the configured models")
    p_run.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config YAML (default: %(default)s)")
    p_run.add_argument("--host", default=None, help="HTTP host (default: the config's, else 127.0.0.1)")
    p_run.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, else 8000)")
    p_run.add_argument("--logical-gpus", type=int, default=2, help="GPUs to declare when NVML finds none")
    p_run.add_argument("--logical-cpus", type=int, default=None, help="CPUs to declare to Ray (default: all)")
    p_run.add_argument(
        "--proxy", choices=["haproxy", "serve"], default=None,
        help="HTTP proxy of the local cluster (default: $GPU_SERVE_PROXY, else haproxy when one runs)",
    )
    p_cfg = sub.add_parser(
        "config", help="print the Serve config as `run` deploys it (each model route its own application), "
        "for `serve run` / `serve deploy`",
    )
    p_cfg.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config YAML (default: %(default)s)")
    p_mcp = sub.add_parser("mcp", help="serve the MCP tools over stdio, forwarding to a running service")
    p_mcp.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL (default: %(default)s)")
    p_mcp.add_argument("--key", default=None, help="admin key (default: $GPU_SERVE_ADMIN_KEY)")
    args = parser.parse_args(argv)
    from serve_app.logs import configure_logging

    configure_logging()
    if args.command == "run":
        return run(args)
    if args.command == "config":
        return print_split_config(Path(args.config))
    if args.command == "mcp":
        return mcp_stdio(args.url, args.key)
    return 1


def print_split_config(path: Path) -> int:
    """The config with each routed model in an application of its own, on stdout."""
    import yaml

    from serve_app.app import split_serve_config

    try:
        doc = split_serve_config(load_serve_config(path))
    except ValueError as exc:  # ConfigError too
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    print(f"# {path} as `python -m serve_app run` deploys it; generated by `python -m serve_app config`.")
    print(yaml.safe_dump(doc, sort_keys=False, width=100), end="")
    return 0


def mcp_stdio(url: str, key: str | None) -> int:
    """stdout carries the protocol: nothing else may print there (logs go to stderr)."""
    import anyio

    from serve_app.api.mcp import HttpBackend, build_server

    server = build_server(HttpBackend(url, key))
    anyio.run(server.run_stdio_async)
    return 0


if __name__ == "__main__":
    sys.exit(main())
