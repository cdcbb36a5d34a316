"""Family `transformers-causal-lm`: chat and text completions from a transformers causal LM.

`Generator` is the model-side work, usable and testable without Serve; the deployment wraps it
in the lifecycle lease. Three decisions, and why:

* Sampling does not use `do_sample=True`. Transformers samples with the process-wide torch RNG,
  so a `seed` could only be honoured by seeding globally, which concurrent requests in the same
  replica would disturb. Instead `_SeededSampler` samples with its own `torch.Generator` and
  masks every other token, and generation runs greedy over that mask: the same seed gives the
  same text whatever else the replica is doing.
* The model's `generation_config.json` only contributes token ids. Hub configs often carry
  sampling defaults (`do_sample`, `top_k`, `repetition_penalty`) that would silently change what
  an OpenAI request asked for; the request's parameters are the whole story here.
* A stream holds the lease until the generation thread has finished, not just until the client
  stops reading: on a disconnect the thread is told to stop and is joined before the lease is
  returned, so an offload can never move weights under a running `generate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from serve_app.adapters.torch_module import TorchModuleAdapter
from serve_app.errors import InvalidRequest
from serve_app.cluster.replica import ModelReplica

logger = logging.getLogger("serve_app.deployments.text_generation")

Messages = list[dict[str, str]]
#: Receives a stream's events, called from its generation thread.
Emit = Callable[[dict[str, Any]], None]


# --- loading -------------------------------------------------------------------------------


@dataclass
class CausalLM:
    """What the adapter holds: the tokenizer travels with the model, `module_of` picks the model."""

    tokenizer: Any
    model: Any


def resolve_dtype(dtype: str, device: str) -> Any:
    """'auto' is float16 on CUDA and float32 on the CPU (float16 matmuls on CPU are slow or missing)."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_causal_lm(path: str, device: str, dtype: str = "auto") -> CausalLM:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local_only = Path(path).exists()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    # `torch_dtype` was renamed `dtype` in transformers 4.56.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=local_only, **{dtype_kw: resolve_dtype(dtype, device)}
    )
    model.to(device)
    model.eval()
    # A fast tokenizer clears stored truncation/padding settings on its first call, a mutation
    # that races with decodes in other threads ("Already borrowed"): pay it once here.
    tokenizer("warm up")
    return CausalLM(tokenizer=tokenizer, model=model)


# --- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """One request's generation knobs, already validated by the API (OpenAI's defaults)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @classmethod
    def from_request(cls, params: dict[str, Any]) -> SamplingParams:
        stop = params.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        return cls(
            max_tokens=params.get("max_tokens"),
            temperature=1.0 if params.get("temperature") is None else float(params["temperature"]),
            top_p=1.0 if params.get("top_p") is None else float(params["top_p"]),
            stop=tuple(s for s in (stop or []) if s),
            seed=params.get("seed"),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int

    @property
    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class StopScanner:
    """Finds the first stop string in text that arrives in pieces, holding back what could start one.

    `feed` returns the text that is safe to show; a suffix that is a prefix of some stop string
    waits for the next piece. Fed the whole text at once it gives the same answer as fed piece
    by piece, so streamed and non-streamed completions end at the same place.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return buf[: min(hits)]
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self.pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def _sampler(params: SamplingParams) -> Any:
    from transformers import LogitsProcessor

    class _SeededSampler(LogitsProcessor):
        """Temperature + nucleus sampling with a private generator; returns a one-hot mask."""

        def __init__(self) -> None:
            self.seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator: Any = None

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            import torch

            if self.generator is None:
                self.generator = torch.Generator(device=scores.device)
                self.generator.manual_seed(self.seed)
            logits = scores.float() / params.temperature
            if params.top_p < 1.0:
                sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
                probs = torch.softmax(sorted_logits, dim=-1)
                # Drop a token when the tokens before it already cover top_p; the first always stays.
                drop = probs.cumsum(dim=-1) - probs > params.top_p
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
                logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
            probs = torch.softmax(logits, dim=-1)
            choice = torch.multinomial(probs, num_samples=1, generator=self.generator)
            return torch.full_like(scores, float("-inf")).scatter(-1, choice, 0.0)

    return _SeededSampler()


def _stopper(tokenizer: Any, prompt_len: int, stops: Sequence[str], cancel: threading.Event) -> Any:
    from transformers import StoppingCriteria

    longest = max((len(s) for s in stops), default=0)

    class _StopCriteria(StoppingCriteria):
        """Ends generation on a stop string in the decoded completion, or when the reader left."""

        def __init__(self) -> None:
            self.checked = 0  # characters already searched, minus an overlap for a straddling stop

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            done = cancel.is_set()
            if not done and stops:
                text = tokenizer.decode(input_ids[0, prompt_len:], skip_special_tokens=True)
                window = text[max(0, self.checked - longest) :]
                done = any(s in window for s in stops)
                self.checked = len(text)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return _StopCriteria()


# --- the model-side work -------------------------------------------------------------------


class Generator:
    """Prompt rendering and generation over the adapter's `CausalLM`; blocking, thread-safe."""

    def __init__(self, adapter: TorchModuleAdapter, max_new_tokens: int) -> None:
        self.adapter = adapter
        self.max_new_tokens = max_new_tokens

    @property
    def lm(self) -> CausalLM:
        lm = self.adapter.model
        if lm is None:
            raise RuntimeError("the model is not loaded; generate under the lifecycle lease")
        return lm

    # prompts

    def render_chat(self, messages: Messages) -> str:
        """The chat template's prompt, or 'role: content' lines and 'assistant:' without one."""
        tokenizer = self.lm.tokenizer
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    def encode(self, source: str | Messages) -> list[int]:
        """Token ids of a completion prompt (str) or a chat (list of messages)."""
        tokenizer = self.lm.tokenizer
        if isinstance(source, str):
            return list(tokenizer(source, add_special_tokens=True)["input_ids"])
        has_template = bool(getattr(tokenizer, "chat_template", None))
        # A template writes its own special tokens (bos included); the plain fallback needs them added.
        return list(tokenizer(self.render_chat(source), add_special_tokens=not has_template)["input_ids"])

    def _budget(self, prompt_len: int, params: SamplingParams, param: str) -> int:
        wanted = min(params.max_tokens or self.max_new_tokens, self.max_new_tokens)
        context = getattr(self.lm.model.config, "max_position_embeddings", None) or getattr(
            self.lm.model.config, "n_positions", None
        )
        if context is None:
            return wanted
        if prompt_len >= context:
            raise InvalidRequest(
                f"the prompt has {prompt_len} tokens, at or beyond the model's context of {context} tokens; "
                "shorten it",
                param=param,
                code="context_length_exceeded",
            )
        return min(wanted, context - prompt_len)

    def _generate_kwargs(self, prompt_ids: list[int], params: SamplingParams, budget: int) -> dict[str, Any]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        lm = self.lm
        base = lm.model.generation_config
        eos = base.eos_token_id if base.eos_token_id is not None else lm.tokenizer.eos_token_id
        pad = base.pad_token_id if base.pad_token_id is not None else lm.tokenizer.pad_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        config = GenerationConfig(
            max_new_tokens=budget, do_sample=False, num_beams=1, repetition_penalty=1.0,
            no_repeat_ngram_size=0, temperature=1.0, top_p=1.0,
            eos_token_id=eos, pad_token_id=pad, bos_token_id=base.bos_token_id,
        )
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.adapter.device)
        processors = LogitsProcessorList([] if params.greedy else [_sampler(params)])
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "generation_config": config,
            "logits_processor": processors,
        }

    def _finish(self, ids: list[int], budget: int, stopped: bool) -> str:
        if stopped:
            return "stop"
        eos = self.lm.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if ids and ids[-1] in eos_ids:
            return "stop"
        return "length" if len(ids) >= budget else "stop"

    # generation

    def generate(
        self, source: str | Messages, params: SamplingParams, cancel: threading.Event | None = None
    ) -> Completion:
        """The whole completion at once; setting `cancel` ends it at the next token."""
        import torch
        from transformers import StoppingCriteriaList

        param = "prompt" if isinstance(source, str) else "messages"
        prompt_ids = self.encode(source)
        budget = self._budget(len(prompt_ids), params, param)
        kwargs = self._generate_kwargs(prompt_ids, params, budget)
        stopper = _stopper(self.lm.tokenizer, len(prompt_ids), params.stop, cancel or threading.Event())
        with torch.inference_mode():
            out = self.lm.model.generate(**kwargs, stopping_criteria=StoppingCriteriaList([stopper]))
        ids = out[0, len(prompt_ids) :].tolist()
        scanner = StopScanner(params.stop)
        text = scanner.feed(self.lm.tokenizer.decode(ids, skip_special_tokens=True))
        text += scanner.flush()
        return Completion(text, self._finish(ids, budget, scanner.stopped), len(prompt_ids), len(ids))

    def start_stream(
        self, source: str | Messages, params: SamplingParams, emit: Emit | None = None
    ) -> TokenStream:
        """Validate and start generating in a thread. Events go to `emit` (called from that
        thread) or, without it, to the returned stream's own iterator."""
        param = "prompt" if isinstance(source, str) else "messages"
        prompt_ids = self.encode(source)
        budget = self._budget(len(prompt_ids), params, param)
        stream = TokenStream(self, prompt_ids, params, budget, emit)
        stream.start()
        return stream


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
        stopper = _stopper(lm.tokenizer, len(self.prompt_ids), self.params.stop, self.cancel_event)
        kwargs.update(
            streamer=_delta_streamer(lm.tokenizer, scanner, self._emit, self.cancel_event),
            stopping_criteria=StoppingCriteriaList([stopper]),
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


# --- the deployment ------------------------------------------------------------------------


@serve.deployment
class TextGenerationDeployment(ModelReplica):
    def __init__(self, model: dict[str, Any], app: dict[str, Any]) -> None:
        super().__init__(model, app)
        self.generator = Generator(self.adapter, self.config.max_new_tokens)

    def make_adapter(self) -> TorchModuleAdapter:
        path, dtype = self.config.resolve_source(), self.config.dtype
        return TorchModuleAdapter(
            lambda device: load_causal_lm(path, device, dtype), weights_path=path, module_of=lambda lm: lm.model
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
