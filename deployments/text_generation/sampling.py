"""A request's generation knobs, stop strings and sampling, as transformers hooks.

Sampling does not use `do_sample=True`: transformers samples with the process-wide torch RNG,
so a `seed` could only be honoured by seeding globally, which concurrent requests in the same
replica would disturb. `sampler()` samples with its own `torch.Generator` and masks every other
token, and generation runs greedy over that mask: the same seed gives the same text whatever
else the replica is doing.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


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


def sampler(params: SamplingParams) -> Any:
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


def stopper(tokenizer: Any, prompt_len: int, stops: Sequence[str], cancel: threading.Event) -> Any:
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
