"""Faults through real Ray Serve: each ends in a clean answer (a result, or an OpenAI-shaped 5xx
with a reason) within the request timeout, never a hang; the control plane comes back.

Runs on the hardened app (keys on, every family, one model no node can host)."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.hardened import (
    API_KEY,
    CORRUPT,
    EMB,
    LM,
    NAMESPACE,
    OOM,
    OOM_AT_BYTES,
    UNPLACEABLE,
    WHISPER,
    admin,
    sdk,
    status,
)

pytestmark = pytest.mark.integration
#: 100 in `make soak` (the issue's figure); fewer in the default suite to keep CI fast (about 1.2 s a cycle here).
CYCLES = int(os.environ.get("GPU_SERVE_FAULT_CYCLES", "20"))
MiB = 1024**2


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def rows(url: str, model: str) -> list[dict[str, Any]]:
    return [m for m in status(url)["models"] if m["model"] == model and m["replica"]]


def status_if_up(url: str) -> dict[str, Any] | None:
    r = httpx.get(f"{url}/gpu/status", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    return r.json() if r.status_code == 200 else None


def test_a_model_no_node_can_host_answers_503_within_seconds(hardened_url: str) -> None:
    url = hardened_url
    health = wait_for(
        lambda: (h := httpx.get(f"{url}/health", timeout=10).json()) and UNPLACEABLE in h["unschedulable"] and h,
        timeout=15, what="the placement check",
    )
    assert health["models"][UNPLACEABLE] == "unschedulable"
    start = time.monotonic()
    r = httpx.post(f"{url}/v1/embeddings", json={"model": UNPLACEABLE, "input": "x"},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    elapsed = time.monotonic() - start
    assert r.status_code == 503 and elapsed < 5, (r.status_code, elapsed)
    err = r.json()["error"]
    assert err["code"] == "model_unschedulable" and "no_such_node_label" in err["message"], err
    assert r.headers["retry-after"]
    (row,) = [m for m in status(url)["models"] if m["model"] == UNPLACEABLE]
    assert row["state"] == "unschedulable" and "no_such_node_label" in row["reason"]
    assert admin(url, "load", {"model": UNPLACEABLE}).status_code == 503
    # The others are unaffected.
    assert EMB not in health["unschedulable"]
    assert len(sdk(url).embeddings.create(model=EMB, input="fine").data) == 1


def test_parallel_first_requests_make_exactly_one_load(hardened_url: str) -> None:
    url = hardened_url
    before = rows(url, LM)
    if before:
        assert admin(url, "release", {"model": LM}).status_code == 200
        wait_for(lambda: rows(url, LM)[0]["state"] == "unloaded", what="the release")
    loads_before = rows(url, LM)[0]["loads"] if before else 0
    client = sdk(url)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(
            lambda i: client.completions.create(model=LM, prompt=f"hello {i}", max_tokens=2), range(8)
        ))
    assert all(o.choices for o in outs)
    (row,) = wait_for(lambda: rows(url, LM), what="the text model's replica")
    assert row["loads"] - loads_before == 1, row


def _speech(path: Path, repeat: int = 6) -> bytes:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    text = " ".join(["The quarterly report goes to the finance team by Friday morning."] * repeat)
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)
    return path.read_bytes()


def test_replica_killed_mid_request_answers_cleanly(hardened_url: str, tmp_path: Path) -> None:
    import ray

    url = hardened_url
    audio = _speech(tmp_path / "long.wav")  # long enough (about 25 s of speech) to be killed in flight
    short = _speech(tmp_path / "short.wav", repeat=1)  # for the requests around it
    client = sdk(url, timeout=120)
    client.audio.transcriptions.create(model=WHISPER, file=("warm.wav", short))  # loaded, so the next one runs
    outcome: dict[str, Any] = {}

    def request() -> None:
        start = time.monotonic()
        try:
            outcome["text"] = client.audio.transcriptions.create(model=WHISPER, file=("long.wav", audio)).text
        except openai.APIStatusError as exc:
            outcome["status"], outcome["body"] = exc.status_code, exc.body
        except Exception as exc:
            outcome["other"] = exc
        outcome["elapsed"] = time.monotonic() - start

    worker = threading.Thread(target=request)
    worker.start()
    (row,) = wait_for(lambda: [r for r in rows(url, WHISPER) if r["in_flight"]], timeout=30, what="in flight")
    ray.kill(ray.get_actor(row["replica"], namespace="serve"), no_restart=True)
    worker.join(timeout=150)
    assert not worker.is_alive(), "the request hung after its replica was killed"
    assert "other" not in outcome, outcome
    if "status" in outcome:
        assert outcome["status"] == 503 and outcome["body"]["code"] == "replica_unavailable", outcome
    else:
        assert outcome["text"], outcome
    print(f"\n[faults] replica killed mid-request: {outcome.get('status', 200)} after {outcome['elapsed']:.1f}s")
    # Serve replaces the replica; the next request is served.
    wait_for(lambda: _transcribes(client, short), timeout=120, what="a new replica to serve")


def _transcribes(client: openai.OpenAI, audio: bytes) -> bool:
    try:
        return bool(client.audio.transcriptions.create(model=WHISPER, file=("again.wav", audio)).text)
    except openai.APIStatusError:
        return False


def test_probe_killed_comes_back_and_readings_resume(hardened_url: str) -> None:
    import ray

    from serve_app.cluster.names import probe_name

    url = hardened_url
    gpus = wait_for(lambda: status(url)["gpus"], what="GPU readings")
    node = gpus[0]["node"]
    assert all("read_s_ago" in g and g["stale"] is False for g in gpus), gpus
    probe = ray.get_actor(probe_name(node), namespace=NAMESPACE)
    ray.kill(probe, no_restart=False)
    killed = time.monotonic()
    time.sleep(1.5)

    def fresh() -> bool:
        mine = [g for g in status(url)["gpus"] if g["node"] == node]
        return bool(mine) and all(g["read_s_ago"] < 1.5 and not g["stale"] for g in mine)

    wait_for(fresh, timeout=60, what="the restarted probe's readings")
    print(f"\n[faults] probe back and reporting {time.monotonic() - killed:.1f}s after ray.kill")


def test_router_killed_mid_load_load_finishes_and_state_is_rebuilt(hardened_url: str) -> None:
    import ray

    from serve_app.cluster.router import ROUTER_NAME

    url = hardened_url
    if rows(url, EMB):
        admin(url, "release", {"model": EMB})
        wait_for(lambda: rows(url, EMB)[0]["state"] == "unloaded", what="the release")
    outcome: dict[str, Any] = {}

    def request() -> None:
        try:
            outcome["dims"] = len(sdk(url).embeddings.create(model=EMB, input="mid-load").data[0].embedding)
        except openai.APIStatusError as exc:
            outcome["status"], outcome["body"] = exc.status_code, exc.body

    worker = threading.Thread(target=request)
    worker.start()
    wait_for(lambda: [r for r in rows(url, EMB) if r["state"] in ("loading", "gpu")] or outcome, timeout=30,
             what="the load to start")
    ray.kill(ray.get_actor(ROUTER_NAME, namespace=NAMESPACE), no_restart=False)
    worker.join(timeout=90)
    assert not worker.is_alive()
    if "status" in outcome:  # a clean failure is allowed; a hang or a 500 is not
        assert outcome["status"] == 503, outcome
    else:
        assert outcome["dims"] == 384
    up = wait_for(lambda: status_if_up(url), timeout=30, what="the router to answer again")
    back = time.monotonic()
    wait_for(lambda: (s := status_if_up(url)) and [m for m in s["models"] if m["model"] == EMB and m["replica"]],
             timeout=30, what="the replicas to re-register")
    rebuilt_s = time.monotonic() - back
    print(f"\n[faults] router state rebuilt {rebuilt_s:.2f}s after it answered again (tick 1 s)")
    assert up["router"]["uptime_s"] < 60
    assert rebuilt_s <= 2.5, "state must be rebuilt within about 2 ticks"
    (row,) = rows(url, EMB)
    assert row["state"] == "gpu" or "status" in outcome


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.soak
def test_load_offload_restore_release_cycles_return_memory(hardened_url: str) -> None:
    from ray import serve

    url = hardened_url
    client = sdk(url)
    client.embeddings.create(model=EMB, input="baseline")
    handle = serve.get_deployment_handle("model-" + EMB, app_name="gpu-serve")
    pid = handle.replica_status.remote().result()["pid"]

    step_s: Counter[str] = Counter()

    def cycle() -> None:
        for step in ("offload", "restore", "release", "load"):
            t0 = time.monotonic()
            if step in ("offload", "release"):
                assert admin(url, step, {"model": EMB}).status_code == 200
            else:
                client.embeddings.create(model=EMB, input=f"cycle {step}")
            step_s[step] += time.monotonic() - t0

    for _ in range(3):  # warm up allocator pools before the baseline
        cycle()
    before = _rss_bytes(pid)
    start = time.monotonic()
    for _ in range(CYCLES):
        cycle()
    after = _rss_bytes(pid)
    assert handle.replica_status.remote().result()["pid"] == pid, "the replica was replaced mid-test"
    print(f"\n[faults] {CYCLES} load/offload/restore/release cycles in {time.monotonic() - start:.0f}s: "
          f"replica RSS {before / MiB:.0f} -> {after / MiB:.0f} MiB (tolerance 64 MiB); mean step "
          f"{ {k: round(v / (CYCLES + 3), 3) for k, v in step_s.items()} } s")
    assert after - before < 64 * MiB, (before, after)


def test_a_load_that_raises_is_503_with_the_reason_and_the_queue_moves_on(hardened_url: str) -> None:
    url = hardened_url
    client = sdk(url)
    for attempt in range(2):  # the next request tries again, and fails the same clean way
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:
            client.embeddings.create(model=CORRUPT, input="x")
        assert info.value.status_code == 503, info.value
        body = info.value.body
        assert body["code"] == "model_load_failed" and CORRUPT in body["message"], body
        assert time.monotonic() - start < 60
        n = attempt + 1
        (row,) = wait_for(
            lambda: [r for r in rows(url, CORRUPT) if r["loads"] == n and r["state"] == "unloaded"],  # noqa: B023
            timeout=10, what="the router to see the failed load",
        )
        assert row["last_error"].startswith("load failed") and row["bytes_gpu"] == 0, row
    # Other models are served meanwhile: nothing waits behind the failed load.
    assert len(client.embeddings.create(model=EMB, input="still fine").data[0].embedding) == 384
    assert not [q for q in status(url)["queue"] if q["model"] == CORRUPT]


def test_a_simulated_oom_at_a_byte_count_is_503_frees_what_it_allocated_and_the_queue_moves_on(
    hardened_url: str,
) -> None:
    """`fault_oom_at_bytes` makes each load of OOM raise torch.OutOfMemoryError part way through
    its weights, inside the real loader. Meanwhile the text model, released, waits for its own
    load: it must be served, and the failed load must leave nothing held and nothing queued."""
    from ray import serve

    url = hardened_url
    client = sdk(url)
    handle = serve.get_deployment_handle("model-" + OOM, app_name="gpu-serve")
    rss: list[int] = []
    shared_gpu = []
    for attempt in range(3):
        if rows(url, LM) and rows(url, LM)[0]["state"] != "unloaded":
            assert admin(url, "release", {"model": LM}).status_code == 200
            wait_for(lambda: rows(url, LM)[0]["state"] == "unloaded", what="the text model's release")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            failing = pool.submit(client.embeddings.create, model=OOM, input="x")
            waiting = pool.submit(client.completions.create, model=LM, prompt="hello", max_tokens=2)
            with pytest.raises(openai.APIStatusError) as info:
                failing.result(timeout=90)
            assert waiting.result(timeout=90).choices, "the other model's request was not served"
        assert info.value.status_code == 503, info.value
        body = info.value.body
        assert body["code"] == "model_load_failed" and OOM in body["message"], body
        assert "OutOfMemoryError" in body["message"] and "simulated out of memory" in body["message"], body
        n = attempt + 1
        (row,) = wait_for(
            lambda: [r for r in rows(url, OOM) if r["loads"] == n and r["state"] == "unloaded"],  # noqa: B023
            timeout=10, what="the router to see the failed load",
        )
        assert row["last_error"].startswith("load failed: OutOfMemoryError") and row["bytes_gpu"] == 0, row
        own = handle.replica_status.remote().result(timeout_s=30)
        fault = own["last_load_fault"]
        # Tripped part way through the weights, and none of what it allocated is alive any more.
        assert fault["tripped"] and OOM_AT_BYTES < fault["allocated_bytes"] < 87 * MiB, fault
        assert fault["held_bytes"] == 0, fault
        rss.append(_rss_bytes(own["pid"]))
        (lm_row,) = rows(url, LM)
        shared_gpu.append(lm_row["gpu"] == row["gpu"])
    assert not [q for q in status(url)["queue"] if q["model"] in (OOM, LM)], status(url)["queue"]
    print(f"\n[faults] simulated OOM at {OOM_AT_BYTES / MiB:.0f} MiB: each failed load allocated "
          f"{fault['allocated_bytes'] / MiB:.1f} MiB and holds {fault['held_bytes']} B after; replica RSS after "
          f"failed loads 1..3: {[round(r / MiB) for r in rss]} MiB; text model on the same GPU: {shared_gpu}")
    # Three failed loads of about 45 MiB each: a leak of one would show as that much growth.
    assert rss[-1] - rss[0] < 32 * MiB, rss
