"""Soak under chaos: concurrent clients on every family while a chaos loop offloads, releases,
loads, changes timeouts, flips simulated external VRAM use, kills replicas, the router and
probes, and changes a deployment's autoscaling bounds through Serve (an in-place update of the
running app from its Serve config, as `serve deploy` does: replicas are added and stopped while
traffic runs). Nothing may be lost or wrong: a request ends in a correct answer, or (retried, as a
client honouring Retry-After would) in a 503 with Retry-After, which is counted and bounded.

Short form in the default suite (`GPU_SERVE_SOAK_REQUESTS`, default 1,000, within
`GPU_SERVE_SOAK_S`, default 150 s); `make soak` runs 10,000.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.conftest import apply_serve_config, fast_autoscaling
from tests.integration.hardened import API_KEY, EMB, LM, NAMESPACE, WHISPER, admin, ingress_pid, status
from tests.integration.test_audio import wer

pytestmark = [pytest.mark.integration, pytest.mark.soak]

REQUESTS = int(os.environ.get("GPU_SERVE_SOAK_REQUESTS", "1000"))
BUDGET_S = float(os.environ.get("GPU_SERVE_SOAK_S", "150"))
CLIENTS = 8
MODELS = (EMB, LM, WHISPER)
SENTENCE = "Please send the quarterly report to the finance team by Friday."
MiB = 1024**2
#: (min_replicas, max_replicas) of a scaled-up model; (0, 1) is the hardened app's own.
SCALE_UP = (2, 2)
#: Seconds between scale changes (up, then back down): a new replica costs a process start and a load.
SCALE_EVERY_S = 20.0


def scaled_up(model: str) -> dict[str, dict[str, Any]]:
    """Autoscaling bounds giving one model SCALE_UP replicas; the others keep their own (so at
    most one model runs extra replicas at a time)."""
    low, high = SCALE_UP
    auto = {**fast_autoscaling(max_replicas=high), "min_replicas": low, "initial_replicas": low}
    return {model: auto}


def _ingress_rss() -> int:
    """RSS of this cluster's ingress replica process, 0 when it is not found."""
    pid = ingress_pid()
    if pid is None:
        return 0
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


class Soak:
    def __init__(self, url: str, audio: bytes, args: dict[str, Any]) -> None:
        self.url, self.audio, self.args = url, audio, args
        self.lock = threading.Lock()
        self.sent = 0
        self.ok: Counter[str] = Counter()
        self.overload_503: Counter[str] = Counter()
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.vectors: dict[str, np.ndarray] = {}
        self.texts: dict[str, str] = {}
        self.stop = threading.Event()
        self.deadline = time.monotonic() + BUDGET_S
        self.chaos: Counter[str] = Counter()
        self.scales: list[str] = []
        #: Most RUNNING replicas of one model at once, as Serve counts them (scale changes show here).
        self.most_replicas = 1
        #: The model the chaos loop has scaled up right now, if any.
        self.scaled: str | None = None

    def take(self) -> int | None:
        with self.lock:
            if self.sent >= REQUESTS or time.monotonic() > self.deadline or len(self.failures) > 20:
                return None
            self.sent += 1
            return self.sent

    def call(self, http: httpx.Client, kind: str, i: int) -> httpx.Response:
        if kind == "embeddings":
            return http.post("/v1/embeddings", json={"model": EMB, "input": f"soak sentence {i % 10}"})
        if kind == "completions":
            body = {"model": LM, "prompt": f"hello {i % 5}", "max_tokens": 3, "temperature": 0}
            return http.post("/v1/completions", json=body)
        return http.post("/v1/audio/transcriptions", data={"model": WHISPER},
                         files={"file": ("s.wav", self.audio)})

    def check(self, kind: str, i: int, r: httpx.Response) -> str | None:
        """None when the answer is right; else what is wrong with it."""
        body = r.json()
        if kind == "embeddings":
            vec = np.asarray(body["data"][0]["embedding"], dtype=np.float32)
            key = f"soak sentence {i % 10}"
            with self.lock:
                ref = self.vectors.setdefault(key, vec)
            cos = float(vec @ ref / (np.linalg.norm(vec) * np.linalg.norm(ref)))
            return None if vec.shape == (384,) and cos > 0.999 else f"embedding off: cos {cos:.4f}"
        if kind == "completions":
            text = body["choices"][0]["text"]
            with self.lock:
                ref_text = self.texts.setdefault(f"hello {i % 5}", text)
            return None if text == ref_text else f"greedy completion changed: {ref_text!r} -> {text!r}"
        w = wer(SENTENCE, body["text"])
        return None if w <= 0.3 else f"transcript WER {w:.2f}: {body['text']!r}"

    def client(self) -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=90) as http:
            while (i := self.take()) is not None:
                kind = "transcriptions" if i % 25 == 0 else "completions" if i % 4 == 0 else "embeddings"
                start = time.monotonic()
                problem = None
                for _attempt in range(8):
                    try:
                        r = self.call(http, kind, i)
                    except httpx.HTTPError as exc:
                        problem = f"{kind}: transport error {exc!r}"
                        break
                    if r.status_code == 503 and r.headers.get("retry-after"):
                        with self.lock:
                            self.overload_503[r.json()["error"]["code"]] += 1
                        time.sleep(min(float(r.headers["retry-after"]), 1.0))
                        problem = f"{kind}: still 503 after retries: {r.text[:200]}"
                        continue
                    if r.status_code != 200:
                        problem = f"{kind}: {r.status_code} {r.text[:300]}"
                        break
                    problem = self.check(kind, i, r)
                    break
                elapsed = time.monotonic() - start
                with self.lock:
                    self.latencies.append(elapsed)
                    if problem is None:
                        self.ok[kind] += 1
                    else:
                        self.failures.append(problem)

    def chaos_loop(self) -> None:
        import ray

        from serve_app.cluster.names import probe_name
        from serve_app.cluster.router import ROUTER_NAME

        rng = random.Random(13)
        kills = itertools.cycle(["kill_replica", "kill_router", "kill_probe"])  # each kind, in turn
        last_kill = 0.0
        while not self.stop.wait(rng.uniform(0.8, 1.6)):
            action = rng.choice(["offload", "release", "load", "timeout", "external", "kill"])
            if action == "kill":
                if time.monotonic() - last_kill < 8.0:
                    continue  # one kill at a time: each needs seconds to come back
                action = next(kills)
            try:
                if action in ("offload", "release", "load"):
                    admin(self.url, action, {"model": rng.choice(MODELS)})
                elif action == "timeout":
                    admin(self.url, "timeout", {"model": rng.choice(MODELS), "idle_timeout_s": rng.choice([0, 2, 300])})
                elif action == "external":
                    router = ray.get_actor(ROUTER_NAME, namespace=NAMESPACE)
                    for gpu in status(self.url)["gpus"]:
                        ray.get(router.simulate_external.remote(gpu["uuid"], rng.choice([0, 0, 512 * MiB])))
                elif action == "kill_replica":
                    rows = [m for m in status(self.url)["models"] if m["replica"] and m["model"] in MODELS]
                    if rows:
                        ray.kill(ray.get_actor(rng.choice(rows)["replica"], namespace="serve"), no_restart=True)
                    last_kill = time.monotonic()
                elif action == "kill_router":
                    ray.kill(ray.get_actor(ROUTER_NAME, namespace=NAMESPACE), no_restart=False)
                    last_kill = time.monotonic()
                elif action == "kill_probe":
                    node = rng.choice(status(self.url)["gpus"])["node"]
                    ray.kill(ray.get_actor(probe_name(node), namespace=NAMESPACE), no_restart=False)
                    last_kill = time.monotonic()
                self.chaos[action] += 1
            except Exception as exc:  # chaos may hit a restarting router: record and go on
                self.chaos[f"{action} (refused: {type(exc).__name__})"] += 1

    def scale_loop(self) -> None:
        """Scale changes on their own schedule, apart from the other chaos: an admin call can wait
        on a drain for most of the CI form's run (CI: a release held the one loop for 30 s, and
        the first scale-up never came)."""
        rng = random.Random(17)
        # The first scale-up comes 3 s in, so that its replica starts while traffic runs.
        next_change = time.monotonic() + 3.0
        while not self.stop.wait(1.0):
            self._count_replicas(MODELS)
            if time.monotonic() < next_change:
                continue
            next_change = time.monotonic() + SCALE_EVERY_S
            try:
                # Up: one model to two replicas (Serve starts one more while traffic runs);
                # down: back to the app's own bounds (Serve stops one, draining its requests).
                if self.scaled is None:
                    scaled = rng.choice(MODELS)
                    apply_serve_config(self.args, scaled_up(scaled))
                    self.scaled = scaled
                    self.scales.append(f"{scaled} up to {SCALE_UP[0]}..{SCALE_UP[1]}")
                else:
                    apply_serve_config(self.args)
                    self.scales.append(f"{self.scaled} back to 0..1")
                    self.scaled = None
                self.chaos["scale"] += 1
            except Exception as exc:  # the controller may be busy: record and go on
                self.chaos[f"scale (refused: {type(exc).__name__})"] += 1

    def _count_replicas(self, models: tuple[str, ...]) -> None:
        """Serve's own count of RUNNING replicas per model (not the router's rows: a killed
        replica's row lingers for replica_timeout_s beside its replacement)."""
        from ray import serve

        try:
            deployments = serve.status().applications["gpu-serve"].deployments
        except Exception:  # the controller is busy applying a config: no reading this time
            return
        for model in models:
            info = deployments.get(f"model-{model}")
            running = info.replica_states.get("RUNNING", 0) if info is not None else 0
            self.most_replicas = max(self.most_replicas, running)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    path = tmp_path_factory.mktemp("soak") / "s.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), SENTENCE], check=True)
    return Path(path).read_bytes()


def test_soak_under_chaos_loses_nothing(hardened_url: str, hardened_args_once: dict[str, Any], clip: bytes) -> None:
    import ray
    from ray import serve

    from serve_app.cluster.router import ROUTER_NAME

    url = hardened_url
    for m in MODELS:  # a known starting point: configured timeouts, every model warm
        admin(url, "timeout", {"model": m, "idle_timeout_s": 300, "release_timeout_s": 1800})
    soak = Soak(url, clip, hardened_args_once)
    warm = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    for kind in ("embeddings", "completions", "transcriptions"):
        r = soak.call(warm, kind, 0)
        assert r.status_code == 200, r.text
    rss_before, ingress_before = _ingress_rss(), ingress_pid()
    assert rss_before > 0, "the ingress process was not found"
    chaos = threading.Thread(target=soak.chaos_loop, daemon=True)
    scaler = threading.Thread(target=soak.scale_loop, daemon=True)
    clients = [threading.Thread(target=soak.client) for _ in range(CLIENTS)]
    start = time.monotonic()
    soak.deadline = start + BUDGET_S
    chaos.start()
    scaler.start()
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=BUDGET_S + 200)
    soak.stop.set()
    chaos.join(timeout=60)
    scaler.join(timeout=60)
    took = time.monotonic() - start
    assert not any(t.is_alive() for t in clients), "a client hung"
    # A scale-up still in effect: give Serve its replica start (bounded) before counting.
    wait_until = time.monotonic() + 60
    while soak.most_replicas < 2 and soak.scaled is not None and time.monotonic() < wait_until:
        soak._count_replicas(MODELS)
        time.sleep(1)
    # Back to the app's own scale (one replica at most per model), for the tests after this one.
    apply_serve_config(hardened_args_once)

    # Settle: no simulated external use, and the router's view converges on each replica's own.
    router = ray.get_actor(ROUTER_NAME, namespace=NAMESPACE)
    for gpu in status(url)["gpus"]:
        ray.get(router.simulate_external.remote(gpu["uuid"], 0))
    mismatches: list[str] = []
    deadline = time.monotonic() + 60  # a stopped replica leaves the router's view after replica_timeout_s
    while time.monotonic() < deadline:
        mismatches = []
        for m in MODELS:
            rows = [r for r in status(url)["models"] if r["model"] == m and r["replica"]]
            try:
                own = serve.get_deployment_handle("model-" + m, app_name="gpu-serve").replica_status.remote().result(
                    timeout_s=30
                )
            except Exception as exc:
                mismatches.append(f"{m}: replica unreachable ({type(exc).__name__})")
                continue
            mine = [r for r in rows if r["replica"] == own["replica"]]
            if len(rows) > 1:
                mismatches.append(f"{m}: the router still lists {len(rows)} replicas after scaling back to one")
            elif not mine or mine[0]["state"] != own["state"]:
                mismatches.append(f"{m}: router says {[(r['replica'][-8:], r['state']) for r in rows]}, "
                                  f"replica {own['replica'][-8:]} says {own['state']}")
        if not mismatches:
            break
        time.sleep(1.0)
    rss_after = _ingress_rss()

    total = sum(soak.ok.values()) + len(soak.failures)
    lat = sorted(soak.latencies)
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(
        f"\n[soak] {total} requests in {took:.0f}s ({dict(soak.ok)}), failures {len(soak.failures)}, "
        f"503s retried {dict(soak.overload_503)}, p50 {p50:.2f}s p99 {p99:.2f}s, chaos {dict(soak.chaos)}, "
        f"scale changes {soak.scales} (most replicas of one model at once: {soak.most_replicas}), "
        f"ingress RSS {rss_before / MiB:.0f} -> {rss_after / MiB:.0f} MiB"
    )
    assert not soak.failures, soak.failures[:5]
    assert total >= min(REQUESTS, 1000) or took >= BUDGET_S - 1, f"only {total} requests in {took:.0f}s"
    assert sum(soak.overload_503.values()) <= max(50, total // 10), soak.overload_503
    assert p99 < 30.0
    assert not mismatches, mismatches
    assert rss_after - rss_before < 100 * MiB, (rss_before, rss_after)
    kills = sum(v for k, v in soak.chaos.items() if k.startswith("kill_") and "refused" not in k)
    assert kills >= 1 and soak.chaos["offload"] + soak.chaos["release"] >= 1, soak.chaos
    assert soak.chaos["scale"] >= 1 and soak.most_replicas >= 2, (soak.chaos, soak.scales, soak.most_replicas)
    # The scale changes updated the app in place: the ingress was never replaced (a rollout would).
    assert ingress_pid() == ingress_before, "the ingress replica was replaced: a scale change rolled out the app"
