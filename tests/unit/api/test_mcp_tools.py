"""The MCP tools over the SDK's in-process client, backed by the ingress operations and the
real router logic (in process): schemas, structured results and tool errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from mcp import Client

from serve_app.api import mcp as mcp_api
from serve_app.api.context import Context, set_context
from serve_app.cluster.router import Router
from serve_app.config import AppConfig
from tests.unit.api.test_events import InProcess
from tests.unit.cluster.test_router import FakeClock, app, info

TOOLS = {"get_gpu_status", "offload_gpu", "release_gpu", "update_gpu_timeout", "load_model", "list_models"}


@pytest.fixture
def router() -> Iterator[Router]:
    r = Router(app(), clock=FakeClock(), start_loops=False)
    set_context(Context(config=AppConfig.model_validate(app()), handles={}, router=InProcess(r)))
    yield r
    set_context(None)


async def call(name: str, args: dict[str, Any] | None = None) -> Any:
    async with Client(mcp_api.build_server(mcp_api.IngressBackend())) as client:
        return await client.call_tool(name, args or {})


async def test_tools_have_typed_input_and_output_schemas(router: Router) -> None:
    async with Client(mcp_api.build_server(mcp_api.IngressBackend())) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    timeout = tools["update_gpu_timeout"].input_schema["properties"]
    assert set(timeout) == {"model", "idle_timeout_s", "release_timeout_s", "timeout_seconds"}
    assert tools["load_model"].input_schema["required"] == ["model"]
    for t in tools.values():
        assert t.output_schema is not None and t.output_schema["type"] == "object", t.name


async def test_status_and_models_come_back_as_structured_content(router: Router) -> None:
    result = await call("get_gpu_status")
    assert not result.is_error
    assert [m["model"] for m in result.structured_content["models"]] == ["a", "b"]
    models = (await call("list_models")).structured_content["models"]
    assert [m["id"] for m in models] == ["a", "b"] and models[0]["family"] == "sentence-transformers"


async def test_timeouts_change_through_the_router_and_the_old_name_still_works(router: Router) -> None:
    result = await call("update_gpu_timeout", {"model": "a", "timeout_seconds": 42})
    assert not result.is_error and result.structured_content["policy"] == {"idle_timeout_s": 42.0}
    assert router.policies["a"]["idle_timeout_s"] == 42.0
    await call("update_gpu_timeout", {"model": "b", "release_timeout_s": 600})
    assert router.policies["b"]["release_timeout_s"] == 600.0


async def test_tool_errors_name_the_unknown_model_or_the_bad_value(router: Router) -> None:
    result = await call("offload_gpu", {"model": "nope"})
    assert result.is_error and "'nope'" in result.content[0].text and "Available models: a, b" in result.content[0].text
    result = await call("update_gpu_timeout", {"model": "a", "idle_timeout_s": -5})
    assert result.is_error and "-5" in result.content[0].text
    result = await call("update_gpu_timeout", {"model": "a"})
    assert result.is_error and "idle_timeout_s" in result.content[0].text
    result = await call("update_gpu_timeout", {"model": "a", "idle_timeout_s": 1, "timeout_seconds": 2})
    assert result.is_error and "disagree" in result.content[0].text


async def test_offload_reaches_every_replica_on_a_gpu(router: Router) -> None:
    await router.register(info("r1", "a", "gpu", bytes_gpu=10))
    await router.register(info("r2", "b", "cpu", bytes_cpu=10))

    async def answer() -> None:
        while not router.registry.results:
            await asyncio.sleep(0.005)
        (cid,) = list(router.registry.results)
        await router.command_done("r1", cid, "offloaded: cpu", info("r1", "a", "cpu", bytes_cpu=10)["status"])

    task = asyncio.ensure_future(answer())
    result = await call("offload_gpu")
    await task
    assert result.structured_content["instances"] == [
        {"model": "a", "replica": "r1", "outcome": "offloaded: cpu", "state": "cpu"}
    ]



def test_building_the_server_leaves_the_root_logger_alone() -> None:
    """The SDK's constructor would give the root logger an INFO level and a rich handler, so
    every library's INFO record would reach stderr from the ingress. A fresh interpreter: under
    pytest the root logger already has handlers, and `basicConfig` then does nothing."""
    import subprocess
    import sys

    script = (
        "import logging\n"
        "from serve_app.api import mcp\n"
        "mcp.build_server(mcp.IngressBackend())\n"
        "logging.getLogger('some.library').info('should not print')\n"
        "root = logging.getLogger()\n"
        "print(logging.getLevelName(root.level), len(root.handlers))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["WARNING", "0"]
    assert "should not print" not in done.stderr
