"""Operator surfaces against the running service: the event stream (as `curl -N` reads it), the
MCP tools through the official SDK over streamable HTTP and over stdio, and the metrics the
local cluster exports to Prometheus after some traffic."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client, StdioServerParameters

from serve_app.cluster.metrics import EXPORTED
from tests.integration.operator_app import EMBED, LM_PLAIN, LM_RAW, LM_SDK, operator_args

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="module")
def url(deploy: Callable[[dict[str, Any]], str]) -> str:
    return deploy(operator_args())


class EventReader:
    """Reads `/gpu/events` on a thread, the way `curl -N` does, and keeps every event."""

    def __init__(self, url: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        try:
            with httpx.stream("GET", f"{url}/gpu/events", timeout=httpx.Timeout(10, read=None)) as r:
                self.raw.append(f"HTTP {r.status_code} {r.headers.get('content-type')}")
                for line in r.iter_lines():
                    self.raw.append(line)
                    if line.startswith("data: "):
                        self.events.append(json.loads(line[6:]))
                    if self._stop.is_set():
                        return
        except httpx.HTTPError as exc:  # the app is redeployed or shut down after the module
            self.raw.append(f"closed: {type(exc).__name__}")

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for e in list(self.events):
                if pred(e):
                    return e
            time.sleep(0.1)
        raise AssertionError(f"no such event within {timeout_s}s; got {self.events[-10:]}")

    def close(self) -> None:
        self._stop.set()


@pytest.fixture(scope="module")
def events(url: str) -> Iterator[EventReader]:
    reader = EventReader(url)
    time.sleep(1.0)  # connected before the traffic starts
    yield reader
    reader.close()


def state_of(url: str, model: str) -> str:
    rows = [m for m in httpx.get(f"{url}/gpu/status", timeout=10).json()["models"] if m["model"] == model]
    return rows[0]["state"]


async def test_mcp_over_streamable_http_and_the_events_it_causes(url: str, events: EventReader) -> None:
    async with Client(f"{url}/mcp/") as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"get_gpu_status", "offload_gpu", "release_gpu", "update_gpu_timeout", "load_model",
                "list_models"} <= names
        models = (await client.call_tool("list_models", {})).structured_content["models"]
        assert {m["id"] for m in models} == {m["id"] for m in operator_args()["models"]}
        loaded = await client.call_tool("load_model", {"model": EMBED})
        assert not loaded.is_error, loaded.content
        assert loaded.structured_content["instances"][0]["state"] == "gpu"
        off = await client.call_tool("offload_gpu", {"model": EMBED})
        assert [i["state"] for i in off.structured_content["instances"]] == ["cpu"]
        status = (await client.call_tool("get_gpu_status", {})).structured_content
        assert [m["state"] for m in status["models"] if m["model"] == EMBED] == ["cpu"]
        bad = await client.call_tool("release_gpu", {"model": "no-such-model"})
        assert bad.is_error and "'no-such-model'" in bad.content[0].text
        bad = await client.call_tool("update_gpu_timeout", {"model": EMBED, "release_timeout_s": 0})
        assert bad.is_error and "release_timeout_s" in bad.content[0].text
    # Every transition the tools caused is on the stream, with its duration and bytes.
    loaded_event = events.wait_for(lambda e: e.get("model") == EMBED and e.get("to") == "gpu")
    assert loaded_event["from"] == "loading" and loaded_event["seconds"] > 0 and loaded_event["bytes"] > 0
    assert loaded_event["gpu"] and loaded_event["replica"]
    offloaded = events.wait_for(lambda e: e.get("model") == EMBED and e.get("to") == "cpu")
    assert offloaded["from"] == "offloading" and offloaded["reason"] == "admin request"
    admit = events.wait_for(lambda e: e.get("action") == "admit" and e.get("model") == EMBED)
    assert "fits on" in admit["reason"]
    assert events.raw[0].startswith("HTTP 200 text/event-stream")
    assert any(line.startswith("id: ") for line in events.raw) and any(
        line == "event: transition" for line in events.raw
    )


async def test_mcp_over_stdio_forwards_to_the_service(url: str) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "serve_app", "mcp", "--url", url], cwd=str(ROOT)
    )
    async with Client(params) as client:
        status = await client.call_tool("get_gpu_status", {})
        assert not status.is_error and {m["model"] for m in status.structured_content["models"]} >= {EMBED}
        result = await client.call_tool("update_gpu_timeout", {"model": EMBED, "timeout_seconds": 900})
        assert not result.is_error and result.structured_content["policy"] == {"idle_timeout_s": 900.0}
        bad = await client.call_tool("offload_gpu", {"model": "no-such-model"})
        assert bad.is_error and "404" in bad.content[0].text and "'no-such-model'" in bad.content[0].text
    rows = [m for m in httpx.get(f"{url}/gpu/status", timeout=10).json()["models"] if m["model"] == EMBED]
    assert all(r["idle_timeout_s"] == 900.0 for r in rows)


def _scrape() -> str:
    import ray

    text = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node.get("Alive") and port:
            with contextlib.suppress(httpx.HTTPError):
                text.append(httpx.get(f"http://{node['NodeManagerAddress']}:{port}/metrics", timeout=5).text)
    return "\n".join(text)


def test_metrics_are_exported_after_traffic(url: str, events: EventReader) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    for _ in range(3):
        client.embeddings.create(model=EMBED, input=["one", "two", "three"])
    # A short idle timeout makes the router evict the model: an eviction with its reason.
    r = httpx.post(f"{url}/gpu/timeout", json={"model": EMBED, "idle_timeout_s": 0.5}, timeout=30)
    assert r.status_code == 200, r.text
    evict = events.wait_for(lambda e: e.get("action") == "evict" and e.get("model") == EMBED)
    assert "idle_timeout_s" in evict["reason"]
    httpx.post(f"{url}/gpu/timeout", json={"model": EMBED, "idle_timeout_s": 900}, timeout=30)
    wanted = {
        "ray_gpu_serve_transition_seconds_bucket", "ray_gpu_serve_evictions_by_reason_total",
        "ray_gpu_serve_model_in_flight", "ray_gpu_serve_embeddings_batch_size_bucket",
        "ray_gpu_serve_admission_wait_seconds_bucket", "ray_gpu_serve_model_instances",
        "ray_gpu_serve_gpu_used_bytes",
    }
    deadline, found, text = time.monotonic() + 90, set(), ""
    while time.monotonic() < deadline:  # Ray's agent exports on its own cycle (about 10 s)
        text = _scrape()
        found = {name for name in wanted if f"\n{name}{{" in text}
        labels = 'move="load"' in text and 'reason="idle_timeout"' in text
        # A series can show up before this eviction's label does (an earlier eviction, another
        # reason): wait for both, within the same deadline.
        if found == wanted and labels:
            break
        time.sleep(2)
    assert found == wanted, f"missing {sorted(wanted - found)}"
    assert 'move="load"' in text and 'reason="idle_timeout"' in text
    ARTIFACTS.mkdir(exist_ok=True)  # samples for the operator's notes (ignored folder)
    (ARTIFACTS / "metrics-sample.txt").write_text(
        "\n".join(line for line in text.splitlines() if line.startswith("ray_gpu_serve")) + "\n"
    )
    (ARTIFACTS / "events-sample.txt").write_text("\n".join(events.raw) + "\n")
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_gpu_serve")}
    bases = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in exported}
    assert bases <= set(EXPORTED), f"exported but not declared in EXPORTED: {sorted(bases - set(EXPORTED))}"


def test_a_streamed_request_that_waits_gets_progress_lines_then_its_chunks(url: str) -> None:
    """The model is scaled to zero: the request waits for a replica and a load, and says so."""
    body = {"model": LM_RAW, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    comments, data = [], []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith(": "):
                assert not data, "progress lines come before the first chunk"
                comments.append(line)
            elif line.startswith("data: "):
                data.append(line[6:])
    assert comments, "a cold model must not leave the client in silence"
    assert all(f"'{LM_RAW}'" in c for c in comments), comments
    assert data[-1] == "[DONE]" and json.loads(data[0])["choices"][0]["delta"]["role"] == "assistant"


def test_openai_clients_ignore_the_progress_lines(url: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model=LM_SDK, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None


def test_the_event_stream_refuses_a_bad_replay_id(url: str) -> None:
    r = httpx.get(f"{url}/gpu/events", params={"after": -1}, timeout=10)
    assert r.status_code == 400 and "after" in r.json()["error"]["message"]


def test_a_non_streamed_request_that_waited_says_how_long_in_headers(url: str) -> None:
    body = {"model": LM_PLAIN, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert float(r.headers["x-gpu-serve-load-s"]) > 0 and float(r.headers["x-gpu-serve-wait-s"]) >= 0
    again = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)  # loaded: it did not wait
    assert "x-gpu-serve-load-s" not in again.headers
