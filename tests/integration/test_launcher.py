"""`python -m serve_app run`, what `make run` starts, end to end in its own local cluster:
it serves, its request path is the one the docs promise, and Ctrl-C stops everything it started.

This runs beside the session's test cluster, as `make run` can beside a test run. The child gets
a fresh shell's environment (no `RAY_*` from the test process), so the launcher chooses the
proxy and the handles' transport itself, as it does for a user.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI

from tests.integration.conftest import PROXY, embeddings_model, free_port

ROOT = Path(__file__).resolve().parents[2]
START_S = 240


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", text], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.fixture(scope="module")
def launched() -> Iterator[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="gpu-serve-launch-"))
    port = free_port()
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "gpu-serve", "route_prefix": "/", "import_path": "serve_app.app:build_app",
            "args": {"models": [embeddings_model()], "router": {"tick_s": 1.0, "probe_interval_s": 1.0}},
        }],
    }
    (work / "serve_config.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(work / "ray"), GPU_SERVE_PROXY=PROXY, GPU_SERVE_LOG_TO_DRIVER="0")
    log = (work / "launcher.log").open("w+")
    child = subprocess.Popen(
        [sys.executable, "-m", "serve_app", "run", "--config", str(work / "serve_config.yaml"), "--logical-gpus", "1"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    state: dict[str, Any] = {"url": url, "child": child, "log": log, "work": work}
    try:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline and child.poll() is None:
            if "Press Ctrl-C to stop." in (work / "launcher.log").read_text():
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the launcher did not come up in {START_S} s:\n{(work / 'launcher.log').read_text()[-3000:]}")
        yield state
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        log.close()


def test_the_launcher_serves_the_configured_model(launched: dict[str, Any]) -> None:
    client = OpenAI(base_url=f"{launched['url']}/v1", api_key="unused", timeout=120)
    out = client.embeddings.create(model="all-MiniLM-L6-v2", input=["GPU memory, managed", "twice"])
    assert [len(d.embedding) for d in out.data] == [384, 384]
    assert [m.id for m in client.models.list().data] == ["all-MiniLM-L6-v2"]


def test_the_ingress_reaches_models_over_the_chosen_transport(launched: dict[str, Any]) -> None:
    """The launcher asks for HAProxy (when it runs) and Serve handles over gRPC. A handle takes its
    transport from the process that made it, when that process first imported `ray.serve`:
    the launcher imported it before setting the variable, and its handles went as Ray actor
    calls (`/gpu/status` said `ray-actor`)."""
    doc = httpx.get(f"{launched['url']}/gpu/status", timeout=30).json()
    assert doc["request_path"] == {"proxy": PROXY, "handles": "grpc", "model_routes": ["all-MiniLM-L6-v2"]}


def test_the_launcher_gives_the_embeddings_model_its_own_route(launched: dict[str, Any]) -> None:
    """One hop from the proxy to the model's replica (`serve_app/routed.py`), announced at start."""
    base = f"{launched['url']}/models/all-MiniLM-L6-v2/v1"
    assert f"One hop:    {base}" in (launched["work"] / "launcher.log").read_text()
    out = OpenAI(base_url=base, api_key="unused", timeout=120).embeddings.create(model="all-MiniLM-L6-v2", input="x")
    assert len(out.data[0].embedding) == 384


def test_ctrl_c_stops_the_service_and_its_cluster(launched: dict[str, Any]) -> None:
    child: subprocess.Popen[bytes] = launched["child"]
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=90) == 0
    log = (launched["work"] / "launcher.log").read_text()
    assert "Stopped the application and the local Ray cluster." in log
    # Ray's processes name their session directory, which lies under this run's RAY_TMPDIR.
    deadline = time.monotonic() + 30
    while (left := _processes_mentioning(str(launched["work"]))) and time.monotonic() < deadline:
        time.sleep(1)
    assert left == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{launched['url']}/health", timeout=5)
