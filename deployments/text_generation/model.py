"""Loading a transformers causal LM, and the model-side work over it (`Generator`).

`Generator` is usable and testable without Serve. The model's `generation_config.json` only
contributes token ids: hub configs often carry sampling defaults (`do_sample`, `top_k`,
`repetition_penalty`) that would silently change what an OpenAI request asked for; the
request's parameters are the whole story here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployments.text_generation.sampling import Completion, SamplingParams, StopScanner, sampler, stopper
from deployments.text_generation.streaming import Emit, TokenStream
from serve_app.adapters.torch_module import TorchModuleAdapter
from serve_app.errors import InvalidRequest

Messages = list[dict[str, str]]


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


def load_causal_lm(path: str, device: str, dtype: str = "auto", cpu_threads: int | None = None) -> CausalLM:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cpu_threads and not device.startswith("cuda"):
        torch.set_num_threads(cpu_threads)

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
        processors = LogitsProcessorList([] if params.greedy else [sampler(params)])
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
        stop = stopper(self.lm.tokenizer, len(prompt_ids), params.stop, cancel or threading.Event())
        with torch.inference_mode():
            out = self.lm.model.generate(**kwargs, stopping_criteria=StoppingCriteriaList([stop]))
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
