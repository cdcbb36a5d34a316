"""Family `transformers-causal-lm`: chat and text completions from a transformers causal LM.

The package splits the family by job: `model.py` loads the model and does the model-side work
(`Generator`), `sampling.py` holds a request's knobs and the sampling and stop hooks,
`streaming.py` runs a streamed generation, and this module is the deployment, which wraps the
work in the lifecycle lease.

A stream holds the lease until the generation thread has finished, not just until the client
stops reading: on a disconnect the thread is told to stop and is joined before the lease is
returned, so an offload can never move weights under a running `generate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from deployments.text_generation.model import CausalLM, Generator, Messages, load_causal_lm, resolve_dtype
from deployments.text_generation.sampling import Completion, SamplingParams, StopScanner
from deployments.text_generation.streaming import TokenStream
from serve_app.adapters.torch_module import TorchModuleAdapter
from serve_app.cluster.replica import ModelReplica
from serve_app.errors import InvalidRequest

logger = logging.getLogger("serve_app.deployments.text_generation")

__all__ = [
    "CausalLM",
    "Completion",
    "Generator",
    "SamplingParams",
    "StopScanner",
    "TextGenerationDeployment",
    "TokenStream",
    "load_causal_lm",
    "resolve_dtype",
]


@serve.deployment
class TextGenerationDeployment(ModelReplica):
    def __init__(self, model: dict[str, Any], app: dict[str, Any]) -> None:
        super().__init__(model, app)
        self.generator = Generator(self.adapter, self.config.max_new_tokens)

    def make_adapter(self) -> TorchModuleAdapter:
        path, dtype, threads = self.config.resolve_source(), self.config.dtype, self.cpu_threads
        return TorchModuleAdapter(
            lambda device: load_causal_lm(path, device, dtype, threads), weights_path=path,
            module_of=lambda lm: lm.model,
        )

    async def generate(
        self, *, prompt: str | None = None, messages: Messages | None = None, **params: Any
    ) -> dict[str, Any]:
        """A whole completion: {"text", "finish_reason", "usage"}.

        Not `self.run(...)`: when a request is cancelled (client gone), `run` returns the lease
        at once while `generate` still runs in its thread, and an offload could then move the
        weights under it. Here a cancel stops generation at the next token, and the lease is
        held until the thread has ended.
        """
        source = _source(prompt, messages)
        sampling = SamplingParams.from_request(params)
        cancel = threading.Event()
        async with self.lifecycle.use():
            work = asyncio.ensure_future(asyncio.to_thread(self.generator.generate, source, sampling, cancel))
            try:
                result = await asyncio.shield(work)
            except asyncio.CancelledError:
                cancel.set()
                await _outlast(work)
                raise
        return {"text": result.text, "finish_reason": result.finish_reason, "usage": result.usage}

    async def generate_stream(
        self, *, prompt: str | None = None, messages: Messages | None = None, **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """{"prompt_tokens"} once the model is ready, then {"text"} deltas, then {"finish_reason", "usage"}.

        The first event lets the caller fail a request (no capacity, bad prompt) before it has
        sent any response headers. The lease covers the whole stream, generation thread included.
        """
        source = _source(prompt, messages)
        sampling = SamplingParams.from_request(params)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def emit(event: dict[str, Any]) -> None:  # called from the generation thread
            with contextlib.suppress(RuntimeError):  # the loop closed under a replica shutdown
                loop.call_soon_threadsafe(events.put_nowait, event)

        async with self.lifecycle.use():
            stream = await asyncio.to_thread(self.generator.start_stream, source, sampling, emit)
            try:
                yield {"prompt_tokens": stream.prompt_tokens}
                while True:
                    event = await events.get()
                    if "error" in event:
                        raise event["error"]
                    yield event
                    if "finish_reason" in event:
                        break
            finally:
                stream.cancel()  # a no-op when generation already ended
                await _outlast(asyncio.ensure_future(asyncio.to_thread(stream.wait)))


async def _outlast(fut: asyncio.Future[Any]) -> None:
    """Wait for `fut` to finish even if we are cancelled meanwhile (the caller re-raises)."""
    while not fut.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({fut})
    if not fut.cancelled():
        fut.exception()  # retrieved: nobody else will look at it, so asyncio must not warn


def _source(prompt: str | None, messages: Messages | None) -> str | Messages:
    if (prompt is None) == (messages is None):
        raise InvalidRequest("give exactly one of prompt and messages")
    return prompt if prompt is not None else list(messages or [])
