"""Deterministic small causal LMs for tests: random weights from a transformers config, saved locally.

No download anywhere: the tokenizer is a byte-level BPE trained here on a fixed corpus (so any
text encodes, nothing maps to an unknown token), wrapped in `PreTrainedTokenizerFast` with
bos/eos/pad tokens and a ChatML-like Jinja chat template. The weights come from a seeded
`from_config`, so two builds with the same arguments produce the same model.

`build_causal_lm_of_size` picks the width of a model so that its float32 parameters take about
a chosen number of bytes: the router tests use it for "a second model of a chosen size".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

Arch = Literal["llama", "gpt2"]

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

#: A ChatML-like template; `add_generation_prompt` opens the assistant's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A GPU holds the weights; the CPU holds them when they are offloaded.",
    "Hello, how are you today? I am fine, thank you. What is the capital of France?",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Once upon a time there was a small model that answered every question.",
    "system: you are a helpful assistant. user: say hello. assistant: hello!",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]


def build_tokenizer(vocab_size: int = 512, *, chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A byte-level BPE tokenizer that needs no download, as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, IM_START, IM_END]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # Like Llama's tokenizer: a plain prompt starts with bos; chat templates write it themselves.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    kwargs: dict[str, Any] = {}
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        **kwargs,
    )


def causal_lm_config(
    arch: Arch, *, vocab_size: int, hidden: int, layers: int, heads: int, bos: int, eos: int, pad: int,
    max_positions: int = 512,
) -> Any:
    """A transformers config for a small model of `arch`; MLP width 2x hidden."""
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=max_positions, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
            tie_word_embeddings=False,
        )
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_inner=2 * hidden, n_layer=layers, n_head=heads,
            n_positions=max_positions, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        )
    raise ValueError(f"unknown arch {arch!r}; expected 'llama' or 'gpt2'")


def build_tiny_causal_lm(
    path: str | Path,
    *,
    arch: Arch = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 512,
    seed: int = 0,
    chat_template: str | None = CHAT_TEMPLATE,
    max_positions: int = 512,
    never_ends: bool = False,
) -> Path:
    """Save a random-weight causal LM and its tokenizer under `path` (created); return `path`.

    `never_ends` zeroes the output layer's eos row: eos then always scores 0, and among hundreds
    of random logits some other token scores higher, so greedy decoding runs to max_tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size, chat_template=chat_template)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    config = causal_lm_config(
        arch, vocab_size=len(tokenizer), hidden=hidden, layers=layers, heads=heads, max_positions=max_positions,
        **ids,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if never_ends:
        with torch.no_grad():
            model.get_output_embeddings().weight[ids["eos"]] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def parameter_bytes(arch: Arch, *, hidden: int, layers: int, heads: int, vocab_size: int) -> int:
    """Float32 bytes of the parameters a model of this shape has, counted without allocating.

    `vocab_size` is the tokenizer's length (`len(build_tokenizer())`), not the trainer's target.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = causal_lm_config(
        arch, vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads, bos=1, eos=2, pad=0
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) * 4


def shape_for_bytes(target_bytes: int, *, arch: Arch = "llama", layers: int = 2, head_dim: int = 16) -> int:
    """The hidden size (a multiple of `head_dim`) whose float32 parameters come closest to `target_bytes`."""
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}")
    vocab = len(build_tokenizer())

    def size(h: int) -> int:
        return parameter_bytes(arch, hidden=h, layers=layers, heads=h // head_dim, vocab_size=vocab)

    lo, hi = 1, 2
    while size(hi * head_dim) < target_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # parameters grow monotonically with the width
        mid = (lo + hi) // 2
        if size(mid * head_dim) < target_bytes:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda k: abs(size(k * head_dim) - target_bytes))
    return best * head_dim


def build_causal_lm_of_size(
    path: str | Path, target_bytes: int, *, arch: Arch = "llama", layers: int = 2, head_dim: int = 16, seed: int = 0
) -> Path:
    """Save a model whose float32 parameters take about `target_bytes` (within one width step)."""
    hidden = shape_for_bytes(target_bytes, arch=arch, layers=layers, head_dim=head_dim)
    return build_tiny_causal_lm(
        path, arch=arch, hidden=hidden, layers=layers, heads=hidden // head_dim, seed=seed
    )
