"""`/v1/embeddings` in one hop (`serve_app/cluster/body_routes.py`): the rules added to the
config Ray's own template renders, run by the real HAProxy in front of two stand-in servers
(an ingress and a model application's replica), each answering with the path it was asked."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.cluster import proxy
from serve_app.cluster.body_routes import MARK, add_body_routes, replicas, routed_backends

MODEL = "all-MiniLM-L6-v2"
DOTTED = "whisper-tiny.en"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render(tmp: Path, servers: dict[str, int], prefix: str = "/") -> str:
    """The config Ray writes for the service's applications (its template, its code)."""
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
    from ray.serve.config import HTTPOptions

    base = prefix.rstrip("/")
    # Ray gives every backend Serve's proxy as a backup server, for an application scaled to zero.
    fallback = ServerConfig("serve-proxy", "127.0.0.1", servers["fallback"])
    backends = {
        "main": BackendConfig(name="http-svc", path_prefix=prefix, app_name="svc", fallback_server=fallback,
                              servers=[ServerConfig("ingress", "127.0.0.1", servers["ingress"])]),
        MODEL: BackendConfig(name=f"http-svc-model-{MODEL}", path_prefix=f"{base}/models/{MODEL}",
                             app_name=f"svc-model-{MODEL}", fallback_server=fallback,
                             servers=[ServerConfig("replica", "127.0.0.1", servers["model"])]),
        DOTTED: BackendConfig(name=f"http-svc-model-{DOTTED}", path_prefix=f"{base}/models/{DOTTED}",
                              app_name=f"svc-model-{DOTTED}", fallback_server=fallback, servers=[]),
    }
    cfg = HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=servers["front"]),
        stats_port=free_port(), metrics_port=free_port(),
        socket_path=str(tmp / "admin.sock"), server_state_base=str(tmp), server_state_file=str(tmp / "state"),
        metrics_socket_path=str(tmp / "metrics.sock"), enable_hap_optimization=False,
    )
    api = HAProxyApi(cfg=cfg, backend_configs=backends, config_file_path=str(tmp / "haproxy.cfg"))
    api._generate_config_file_internal()
    return (tmp / "haproxy.cfg").read_text()


def test_routed_models_are_found_in_rays_config(tmp_path: Path) -> None:
    config = render(tmp_path, {"ingress": 1, "model": 2, "front": 3, "fallback": 4})
    assert routed_backends(config) == {MODEL: (f"http-svc-model-{MODEL}", ""), DOTTED: (f"http-svc-model-{DOTTED}", "")}
    assert replicas(config)[f"http-svc-model-{MODEL}"] == ["replica"] and replicas(config)["http-svc"] == ["ingress"]
    assert replicas(config)[f"http-svc-model-{DOTTED}"] == [], "the backup server is not a replica"
    routed = add_body_routes(config)
    assert routed.count(MARK) == 1 and add_body_routes(routed) == routed, "added once, on every reload"
    # The rules come before the backend is chosen.
    assert routed.index(MARK) < routed.index("    use_backend ")
    prefixed = add_body_routes(render(tmp_path, {"ingress": 1, "model": 2, "front": 3, "fallback": 4}, prefix="/api"))
    assert f"set-path /api/models/{MODEL}/v1/embeddings" in prefixed
    assert "acl gs_v1_0 path /api/v1/embeddings" in prefixed
    plain = config.replace("/models/", "/other/")
    assert add_body_routes(plain) == plain, "no routed model: Ray's config as it is"


class _Echo(BaseHTTPRequestHandler):
    name = ""

    def do_GET(self) -> None:  # HAProxy's health checks
        self._answer({"server": self.name, "path": self.path})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self._answer({"server": self.name, "path": self.path, "bytes": len(body)})

    def _answer(self, doc: dict[str, Any]) -> None:
        out = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *_: Any) -> None:
        pass


def _serve(name: str) -> ThreadingHTTPServer:
    handler = type(f"Echo_{name}", (_Echo,), {"name": name})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[dict[str, Any]]:
    binary = proxy.find_haproxy()
    if binary is None:
        pytest.skip("no runnable haproxy (ray[serve] bundles one)")
    ingress, model, fallback = _serve("ingress"), _serve("model"), _serve("serve-proxy")
    front = free_port()
    ports = {"ingress": ingress.server_address[1], "model": model.server_address[1],
             "fallback": fallback.server_address[1], "front": front}
    config = render(tmp_path, ports)
    (tmp_path / "haproxy.cfg").write_text(config)
    argv = proxy.launch_argv(binary, ["-db", "-f", str(tmp_path / "haproxy.cfg")])
    assert argv[-1] == f"{tmp_path / 'haproxy.cfg'}.routes", "the launcher runs the config with the routes"
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{front}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/x", timeout=2)
                break
            except httpx.HTTPError:
                assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
                assert time.monotonic() < deadline, "haproxy did not start"
                time.sleep(0.1)
        yield {"url": url, "model": model}
    finally:
        child.terminate()
        child.wait(timeout=10)
        for server in (ingress, model, fallback):
            server.shutdown()


def test_a_body_naming_a_routed_model_goes_to_its_application(haproxy: dict[str, Any]) -> None:
    url = haproxy["url"]

    def post(body: Any, path: str = "/v1/embeddings") -> dict[str, Any]:
        r = httpx.post(f"{url}{path}", content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                       headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    one_hop = {"server": "model", "path": f"/models/{MODEL}/v1/embeddings"}
    assert post({"model": MODEL, "input": "x"}).items() >= one_hop.items()
    assert post({"input": ["a"] * 50, "encoding_format": "base64", "model": MODEL}).items() >= one_hop.items()
    assert post(b'{ "input" : "x" ,\n  "model"\t:  "' + MODEL.encode() + b'" }').items() >= one_hop.items()
    # Anything else is the ingress's, as Ray routes it.
    ingress = {"server": "ingress", "path": "/v1/embeddings"}
    assert post({"model": "other", "input": "x"}).items() >= ingress.items()
    assert post({"model": "other", "input": f'"model": "{MODEL}"'}).items() >= ingress.items(), "text in a string"
    assert post({"model": f"{MODEL}-v2", "input": "x"}).items() >= ingress.items()
    assert post({"model": MODEL, "input": "x"}, "/v1/embeddingsx")["server"] == "ingress"
    # A routed model without a replica up (scaled to zero): the ingress, which starts one (and
    # answers 503 at once for a model no node can host), not Serve's proxy, the backup server.
    assert post({"model": DOTTED, "input": "x"}).items() >= ingress.items()
    # The body reaches the server whole.
    assert post({"model": MODEL, "input": "y" * 40_000})["bytes"] > 40_000
    # The model's replica stops: its requests take the ingress once HAProxy sees it down.
    haproxy["model"].shutdown()
    haproxy["model"].server_close()
    deadline = time.monotonic() + 15
    while True:
        try:
            if post({"model": MODEL, "input": "x"})["server"] == "ingress":
                break
        except (AssertionError, httpx.HTTPError):
            pass
        assert time.monotonic() < deadline, "requests still sent to a stopped replica"
        time.sleep(0.25)
