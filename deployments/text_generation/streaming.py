"""Streaming generation: `generate` in its own thread, text pushed to the event loop as decoded."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from deployments.text_generation.sampling import SamplingParams, StopScanner, stopper, usage

if TYPE_CHECKING:
    from deployments.text_generation.model import Generator

#: Receives a stream's events, called from its generation thread.
Emit = Callable[[dict[str, Any]], None]


def _delta_streamer(tokenizer: Any, scanner: StopScanner, emit: Emit, stop: threading.Event) -> Any:
    """A `TextStreamer` that pushes each finished piece of text through the stop scanner to `emit`.

    `TextIteratorStreamer` is this same `TextStreamer` (its word-boundary decoding) with a
    blocking queue in front: a reader has to park a thread on `queue.get` per stream. On the
    replica that would be a thread of the shared `to_thread` pool (6 on 2 cores) per stream, so
    a few slow streams would hold up every adapter move; pushing from the generation thread
    into the event loop's queue parks nothing.
    """
    from transformers import TextStreamer

    class _DeltaStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            shown = scanner.feed(text)
            if shown:
                emit({"text": shown})
            if scanner.stopped:
                stop.set()

    return _DeltaStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class TokenStream:
    """One streaming generation: `generate` in its own thread, text pushed as it is decoded.

    Events: {"text": delta}..., then {"finish_reason", "usage"}, or {"error": exception}. With
    no `emit`, iterate the stream (it raises the error). `cancel()` may be called from any
    thread; `wait()` returns once the generation thread has ended.
    """

    def __init__(
        self, generator: Generator, prompt_ids: list[int], params: SamplingParams, budget: int,
        emit: Emit | None = None,
    ) -> None:
        self.generator = generator
        self.prompt_ids = prompt_ids
        self.params = params
        self.budget = budget
        self.cancel_event = threading.Event()
        self._queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._emit = emit or self._queue.put
        self._thread: threading.Thread | None = None
        self._ids: list[int] = []
        self._done = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def start(self) -> None:
        from transformers import StoppingCriteriaList

        lm = self.generator.lm
        scanner = StopScanner(self.params.stop)
        kwargs = self.generator._generate_kwargs(self.prompt_ids, self.params, self.budget)
        stop = stopper(lm.tokenizer, len(self.prompt_ids), self.params.stop, self.cancel_event)
        kwargs.update(
            streamer=_delta_streamer(lm.tokenizer, scanner, self._emit, self.cancel_event),
            stopping_criteria=StoppingCriteriaList([stop]),
        )
        self._thread = threading.Thread(
            target=self._run, args=(lm.model, kwargs, scanner), daemon=True, name="generate-stream"
        )
        self._thread.start()

    def _run(self, model: Any, kwargs: dict[str, Any], scanner: StopScanner) -> None:
        import torch

        try:
            with torch.inference_mode():
                out = model.generate(**kwargs)  # the streamer has seen all text when this returns
            self._ids = out[0, len(self.prompt_ids) :].tolist()
            rest = scanner.flush()
            if rest:
                self._emit({"text": rest})
            finish = self.generator._finish(self._ids, self.budget, scanner.stopped)
            self._emit({"finish_reason": finish, "usage": usage(self.prompt_tokens, len(self._ids))})
        except BaseException as exc:
            self._emit({"error": exc})

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._done:
            raise StopIteration
        event = self._queue.get()
        if "error" in event:
            self._done = True
            raise event["error"]
        self._done = "finish_reason" in event
        return event

    def cancel(self) -> None:
        self.cancel_event.set()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
