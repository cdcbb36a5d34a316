"""`Generator` on the CPU with a tiny random-weight Llama: no Ray, no Serve, no download.

The model is built once per module (`tests/textmodel.py`); its output is nonsense, but it is
deterministic nonsense, which is what these tests compare.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from deployments.text_generation import (
    Generator,
    SamplingParams,
    StopScanner,
    TextGenerationDeployment,
    load_causal_lm,
    resolve_dtype,
)
from serve_app.adapters.torch_module import TorchModuleAdapter
from serve_app.core.lifecycle import Lifecycle
from serve_app.core.states import ModelState
from serve_app.errors import InvalidRequest
from tests.textmodel import build_tiny_causal_lm

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


def make_adapter(path: Path) -> TorchModuleAdapter:
    return TorchModuleAdapter(
        lambda device: load_causal_lm(str(path), device), weights_path=str(path), module_of=lambda lm: lm.model
    )


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def adapter(model_path: Path) -> TorchModuleAdapter:
    adapter = make_adapter(model_path)
    adapter.load("cpu")
    return adapter


@pytest.fixture
def gen(adapter: TorchModuleAdapter) -> Generator:
    return Generator(adapter, max_new_tokens=64)


def stream_text(gen: Generator, source: Any, params: SamplingParams) -> tuple[str, dict[str, Any]]:
    events = list(gen.start_stream(source, params))
    *deltas, last = events
    assert all(set(e) == {"text"} and e["text"] for e in deltas)
    return "".join(e["text"] for e in deltas), last


# --- the lifecycle moves keep the weights ---------------------------------------------------


def test_greedy_output_survives_offload_restore_and_reload(model_path: Path) -> None:
    adapter = make_adapter(model_path)
    adapter.load("cpu")
    gen = Generator(adapter, max_new_tokens=64)
    before = gen.generate(CHAT, GREEDY)
    assert before.completion_tokens > 0

    adapter.to_cpu()
    adapter.to_gpu()
    assert gen.generate(CHAT, GREEDY) == before

    adapter.release()
    assert adapter.model is None
    with pytest.raises(RuntimeError, match="not loaded"):
        gen.generate(CHAT, GREEDY)
    adapter.load("cpu")
    assert gen.generate(CHAT, GREEDY) == before
    assert adapter.footprint().bytes_gpu > 0  # "gpu" tier = the serving device, the CPU here


def test_builder_is_deterministic(tmp_path: Path, model_path: Path) -> None:
    other = build_tiny_causal_lm(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (other / name).read_bytes() == (model_path / name).read_bytes(), name


def test_dtype_auto_is_float16_on_cuda_and_float32_on_cpu(gen: Generator) -> None:
    import torch

    assert resolve_dtype("auto", "cuda:0") is torch.float16
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    assert gen.lm.model.dtype is torch.float32


# --- prompts -------------------------------------------------------------------------------


def test_chat_template_is_used_when_the_tokenizer_has_one(gen: Generator) -> None:
    prompt = gen.render_chat([{"role": "user", "content": "hi"}])
    assert prompt == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = gen.encode([{"role": "user", "content": "hi"}])
    assert ids.count(gen.lm.tokenizer.bos_token_id) == 1  # written by the template, not added twice


def test_plain_fallback_without_a_chat_template(tmp_path: Path) -> None:
    path = build_tiny_causal_lm(tmp_path / "no-template", chat_template=None)
    adapter = make_adapter(path)
    adapter.load("cpu")
    gen = Generator(adapter, max_new_tokens=8)
    assert not gen.lm.tokenizer.chat_template
    prompt = gen.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert prompt == "system: Be brief.\nuser: hi\nassistant:"
    ids = gen.encode([{"role": "user", "content": "hi"}])
    assert ids[0] == gen.lm.tokenizer.bos_token_id
    out = gen.generate([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4, temperature=0))
    assert out.completion_tokens == 4


def test_prompt_longer_than_the_context_is_rejected(gen: Generator) -> None:
    long_prompt = " ".join(str(i) for i in range(2000))
    with pytest.raises(InvalidRequest, match="context of 512 tokens") as err:
        gen.generate(long_prompt, GREEDY)
    assert err.value.param == "prompt"


# --- generation parameters -----------------------------------------------------------------


def test_usage_counts(gen: Generator) -> None:
    out = gen.generate(CHAT, SamplingParams(max_tokens=10, temperature=0))
    assert out.prompt_tokens == len(gen.encode(CHAT))
    assert out.completion_tokens == 10
    assert out.finish_reason == "length"
    assert out.usage == {
        "prompt_tokens": out.prompt_tokens, "completion_tokens": 10, "total_tokens": out.prompt_tokens + 10
    }

    plain = gen.generate("Once upon a time", SamplingParams(max_tokens=5, temperature=0))
    assert plain.prompt_tokens == len(gen.lm.tokenizer("Once upon a time")["input_ids"])


def test_max_tokens_is_capped_by_max_new_tokens(adapter: TorchModuleAdapter) -> None:
    gen = Generator(adapter, max_new_tokens=6)
    out = gen.generate(CHAT, SamplingParams(max_tokens=100, temperature=0))
    assert (out.completion_tokens, out.finish_reason) == (6, "length")
    assert gen.generate(CHAT, SamplingParams(temperature=0)).completion_tokens == 6  # no max_tokens: the cap


def test_stop_string_truncates_and_finishes_with_stop(gen: Generator) -> None:
    full = gen.generate(CHAT, GREEDY)
    stop = full.text[len(full.text) // 2 :][:2]  # two characters from the middle of the greedy text
    expected = full.text[: full.text.index(stop)]

    out = gen.generate(CHAT, SamplingParams(max_tokens=24, temperature=0, stop=("never-appears", stop)))
    assert out.text == expected
    assert out.finish_reason == "stop"
    assert out.completion_tokens < full.completion_tokens  # generation ended early, not just the text

    text, last = stream_text(gen, CHAT, SamplingParams(max_tokens=24, temperature=0, stop=(stop,)))
    assert text == expected
    assert last["finish_reason"] == "stop"
    assert last["usage"]["completion_tokens"] == out.completion_tokens


@pytest.mark.parametrize(
    ("pieces", "stops", "shown"),
    [
        (["hello wor", "ld"], ["world"], "hello "),
        (["ab", "c"], ["abcd", "c"], "ab"),
        (["a", "b", "x"], ["abc"], "abx"),
        (["xy", "z"], ["b", "yz"], "x"),
        (["plain"], [], "plain"),
    ],
)
def test_stop_scanner_pieces_agree_with_whole_text(pieces: list[str], stops: list[str], shown: str) -> None:
    scanner = StopScanner(stops)
    streamed = "".join(scanner.feed(p) for p in pieces) + scanner.flush()
    whole = StopScanner(stops)
    assert streamed == whole.feed("".join(pieces)) + whole.flush() == shown


def test_seed_makes_sampling_reproducible(gen: Generator) -> None:
    def sample(seed: int | None) -> str:
        return gen.generate(CHAT, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=seed)).text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(None) != sample(None)  # unseeded: each request draws its own seed
    greedy = gen.generate(CHAT, GREEDY).text
    assert gen.generate(CHAT, SamplingParams(max_tokens=24, temperature=0, seed=1)).text == greedy


def test_streaming_matches_non_streaming(gen: Generator) -> None:
    for params in (GREEDY, SamplingParams(max_tokens=16, temperature=0.7, seed=3)):
        whole = gen.generate(CHAT, params)
        text, last = stream_text(gen, CHAT, params)
        assert text == whole.text
        assert last == {"finish_reason": whole.finish_reason, "usage": whole.usage}


def test_cancelled_stream_stops_its_thread(gen: Generator) -> None:
    stream = gen.start_stream(CHAT, SamplingParams(max_tokens=64, temperature=0))
    assert "text" in next(stream)
    start = time.perf_counter()
    stream.cancel()
    stream.wait()
    assert time.perf_counter() - start < 5.0
    assert len(stream._ids) < 64  # stopped early, not run to max_tokens


def test_finish_reason_stop_on_eos(gen: Generator) -> None:
    eos = gen.lm.model.generation_config.eos_token_id
    assert gen._finish([5, eos], budget=2, stopped=False) == "stop"
    assert gen._finish([5, 6], budget=2, stopped=False) == "length"
    assert gen._finish([5], budget=2, stopped=True) == "stop"


# --- the deployment holds the lease for a whole stream --------------------------------------


def bare_deployment(adapter: TorchModuleAdapter) -> Any:
    """The deployment's methods on a hand-built instance: a real Lifecycle, no Serve, no router."""
    cls = TextGenerationDeployment.func_or_class
    dep = cls.__new__(cls)
    dep.adapter = adapter
    dep.lifecycle = Lifecycle(model="tiny", adapter=adapter, device="cpu")
    dep.generator = Generator(adapter, max_new_tokens=64)
    return dep


async def test_offload_waits_for_a_running_stream(model_path: Path) -> None:
    dep = bare_deployment(make_adapter(model_path))
    stream = dep.generate_stream(messages=CHAT, max_tokens=24, temperature=0)
    first = await anext(stream)
    assert first["prompt_tokens"] > 0
    assert dep.lifecycle.state is ModelState.GPU and dep.lifecycle.in_flight == 1

    offload = asyncio.create_task(dep.lifecycle.offload("test"))
    events = [e async for e in stream]
    assert events[-1]["finish_reason"] == "length"
    outcome = await offload
    assert outcome == "offloaded: cpu"  # queued behind the stream, ran once it ended
    assert dep.lifecycle.in_flight == 0

    again = await dep.generate(messages=CHAT, max_tokens=24, temperature=0)  # restores, then serves
    assert dep.lifecycle.state is ModelState.GPU
    assert again["text"] == "".join(e.get("text", "") for e in events)


async def test_closing_a_stream_early_returns_the_lease(model_path: Path) -> None:
    dep = bare_deployment(make_adapter(model_path))
    stream = dep.generate_stream(prompt="Once upon a time", max_tokens=64, temperature=0)
    await anext(stream)
    await anext(stream)
    await stream.aclose()  # what Serve does when the client disconnects
    assert dep.lifecycle.in_flight == 0
    assert await dep.lifecycle.offload("test") == "offloaded: cpu"


async def test_cancelled_request_keeps_the_lease_until_generation_stops(model_path: Path) -> None:
    dep = bare_deployment(make_adapter(model_path))
    await dep.lifecycle.load()
    # The third forward pass waits for the test, so generation is surely mid-way when the
    # request is cancelled (on an idle machine 64 tokens took under the 50 ms the test waits).
    gate, inside = threading.Event(), threading.Event()
    calls = 0

    def pause(*_: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            inside.set()
            assert gate.wait(timeout=60), "the test never opened the gate"

    hook = dep.adapter.model.model.register_forward_pre_hook(pause)
    try:
        task = asyncio.create_task(dep.generate(messages=CHAT, max_tokens=64, temperature=0))
        while not inside.is_set():
            await asyncio.sleep(0.001)
        offload = asyncio.create_task(dep.lifecycle.offload("test"))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not offload.done() and not task.done()  # the generation thread still holds the model
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        gate.set()
        hook.remove()
    assert dep.lifecycle.in_flight == 0
    assert await offload == "offloaded: cpu"


async def test_a_bad_prompt_fails_a_stream_before_its_first_event(model_path: Path) -> None:
    dep = bare_deployment(make_adapter(model_path))
    stream = dep.generate_stream(prompt=" ".join(str(i) for i in range(2000)), max_tokens=4)
    with pytest.raises(InvalidRequest, match="context of 512 tokens"):
        await anext(stream)
    assert dep.lifecycle.in_flight == 0
