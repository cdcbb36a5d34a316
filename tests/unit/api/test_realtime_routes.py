"""The realtime routes' key rules (with keys set), the live page shell, and the parsing of
client events that needs no model."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from serve_app.api import live
from serve_app.api.auth import Access, AuthMiddleware, KeySet, required_access
from serve_app.api.realtime import MAX_APPEND_BYTES, RealtimeConnection, decode_append
from serve_app.errors import InvalidRequest

API, ADMIN = "sk-infer-0123456789", "sk-admin-9876543210"


@pytest.mark.parametrize(
    ("method", "path", "access"),
    [
        ("GET", "/asr", Access.INFER),
        ("GET", "/realtime", Access.OPEN),
        ("HEAD", "/realtime", Access.OPEN),
        ("POST", "/realtime", Access.ADMIN),
        ("GET", "/realtime/anything", Access.ADMIN),
        ("GET", "/v1/realtime", Access.INFER),
    ],
)
def test_rule_table(method: str, path: str, access: Access) -> None:
    assert required_access(method, path) is access


def keyed_app() -> TestClient:
    app = FastAPI()
    app.include_router(live.router)

    @app.websocket("/asr")
    async def asr(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_json({"type": "config", "useAudioWorklet": True})
        await ws.close()

    keys = KeySet.from_keys([API], [ADMIN])
    return TestClient(AuthMiddleware(app, keys=lambda: keys))


def test_asr_needs_an_inference_key_and_the_page_shell_is_open() -> None:
    c = keyed_app()
    page = c.get("/realtime")
    assert page.status_code == 200 and "Start microphone" in page.text and "/v1/realtime" in page.text
    with c.websocket_connect("/asr?api_key=" + API) as ws:
        assert ws.receive_json()["type"] == "config"
    with c.websocket_connect("/asr", headers={"Authorization": "Bearer " + ADMIN}) as ws:
        assert ws.receive_json()["type"] == "config"
    for url in ("/asr", "/asr?api_key=wrong"):
        with pytest.raises(WebSocketDisconnect) as info, c.websocket_connect(url) as ws:
            ws.receive_json()
        denial: Any = info.value
        assert denial.status_code == 401


def test_the_page_ships_as_package_data() -> None:
    assert "getUserMedia" in live.page()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_decode_append_errors_name_the_field_and_code() -> None:
    assert decode_append({"audio": b64(b"\x00\x40\x00\x80")}).tolist() == [0.5, -1.0]
    cases = [
        ({"audio": "not base64!!"}, "invalid_base64"),
        ({"audio": b64(b"\x00\x01\x02")}, "invalid_audio"),
        ({}, "invalid_audio"),
        ({"audio": "A" * (MAX_APPEND_BYTES + 4)}, "audio_too_large"),
    ]
    for event, code in cases:
        with pytest.raises(InvalidRequest) as info:
            decode_append(event)
        assert info.value.code == code and info.value.param == "audio"


def test_turn_detection_settings_are_checked() -> None:
    check = RealtimeConnection._check_turn
    assert check({"type": "server_vad"})["silence_duration_ms"] == 500
    assert check({"type": "server_vad", "threshold": 0.7})["threshold"] == 0.7
    for bad in ({"type": "semantic_vad"}, {"threshold": 1.5}, {"silence_duration_ms": -1}, "on"):
        with pytest.raises(InvalidRequest):
            check(bad)
