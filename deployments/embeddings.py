"""Family `sentence-transformers`: text embeddings with continuous batching.

Requests from many clients are merged into one forward pass (`serve_app/cluster/batching.py`):
on our 2-core test machine, batches of 32 gave about 3.5-4x the sentences per second of
one-at-a-time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray import serve

from serve_app.adapters.torch_module import TorchModuleAdapter
from serve_app.cluster.batching import ContinuousBatcher
from serve_app.cluster.replica import ModelReplica, cpu_threads


def load_sentence_transformer(path: str, device: str, cpu_threads: int | None = None) -> Any:
    import torch
    from sentence_transformers import SentenceTransformer

    if cpu_threads and not device.startswith("cuda"):
        torch.set_num_threads(cpu_threads)
    return SentenceTransformer(path, device=device, local_files_only=not _is_hub_id(path))


def _is_hub_id(path: str) -> bool:
    from pathlib import Path

    return not Path(path).exists()


class Embedder:
    """The model-side work, separate from Serve so it can be used and tested directly."""

    #: A forward pass over at least this many (padded) tokens runs on every core; a smaller one on
    #: `threads[0]`. MiniLM on 2 cores, one process, 4 interleaved rounds: 1 text 16.1 ms on one
    #: thread against 20.3 on two, 2 texts 21.2 / 26.0, 4 texts 31.0 / 31.1, 8 texts 45.6 / 47.9,
    #: 16 texts (about 16 tokens each) 99.1 / 69.5, 32 texts 188.5 / 138.4 ms.
    PARALLEL_TOKENS = 256

    def __init__(self, adapter: TorchModuleAdapter, batch_size: int, threads: tuple[int, int] | None = None) -> None:
        """`threads`: (small pass, large pass) torch threads on the CPU; None leaves torch's setting."""
        self.adapter = adapter
        self.batch_size = batch_size
        self.threads = threads

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Vectors and token counts, tokenizing each text once.

        `SentenceTransformer.encode` tokenizes internally and does not return the counts, so
        counting tokens meant a second tokenizer pass over every input. Here each chunk of
        `batch_size` texts, sorted by length as `encode` does (less padding), is tokenized once
        and run through the model's forward; the counts come from the attention mask.
        """
        import torch

        model = self.adapter.model
        # sentence-transformers 6 renamed these (the old names warn on every call); 3-5 have only the old.
        preprocess = getattr(model, "preprocess", None) or model.tokenize
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        vectors = np.empty((len(texts), dimension() or 0), dtype=np.float32)
        tokens = [0] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                chunk = order[start : start + self.batch_size]
                features = preprocess([texts[i] for i in chunk])
                counts = features["attention_mask"].sum(dim=1).tolist()
                self._set_threads(features["attention_mask"].numel())
                features = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in features.items()}
                out = model(features)["sentence_embedding"].float().cpu().numpy()
                for row, i in enumerate(chunk):
                    vectors[i] = out[row]
                    tokens[i] = int(counts[row])
        return vectors, tokens

    def _set_threads(self, padded_tokens: int) -> None:
        if self.threads is None or str(self.adapter.model.device) != "cpu":
            return
        import torch

        want = self.threads[1] if padded_tokens >= self.PARALLEL_TOKENS else self.threads[0]
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)


@serve.deployment
class EmbeddingsDeployment(ModelReplica):
    #: A small forward pass is short (about 20 ms for one sentence), and torch's threads meet at a
    #: barrier on every op: one preempted by the proxy or the client stalls the rest. On 2 cores,
    #: one thread against two, 3 interleaved rounds on the model's own route: 1-client p50
    #: 27.6/30.0/30.7 against 31.9/34.6/32.7 ms, 8 clients 77/61/65 against 74/63/61 requests/s.
    #: Large passes still take every core (`Embedder.PARALLEL_TOKENS`).
    RESERVED_CORES = 1

    def __init__(self, model: dict[str, Any], app: dict[str, Any]) -> None:
        self.batches = self.texts = 0  # before the base class starts reporting `work_stats`
        super().__init__(model, app)
        # A configured `cpu_threads` is taken as it is; by default a small pass leaves a core to the
        # request path and a large one uses them all (`Embedder.PARALLEL_TOKENS`).
        threads = None if self.config.cpu_threads else (self.cpu_threads, cpu_threads(None))
        self.embedder = Embedder(self.adapter, self.config.max_batch_size, threads)
        # Counted in texts: a request of 32 sentences is a full batch on its own.
        # Each item is a request's texts and its arrival time: a forward pass serves several
        # requests, and the router's trace must count each, not each batch.
        self.batcher: ContinuousBatcher[tuple[list[str], float], dict[str, Any]] = ContinuousBatcher(
            self.embed_batch, self.config.max_batch_size, size=lambda item: len(item[0]),
            wait_s=self.config.batch_wait_timeout_s, regather_s=self.config.batch_regather_s,
        )
        from serve_app.cluster.metrics import embeddings_batch_histogram

        self.batch_sizes: Any = embeddings_batch_histogram()

    def make_adapter(self) -> TorchModuleAdapter:
        path = self.config.resolve_source()
        threads = self.cpu_threads
        return TorchModuleAdapter(
            lambda device: load_sentence_transformer(path, device, threads), weights_path=path
        )

    def work_stats(self) -> dict[str, Any]:
        """Forward passes and texts since start: their ratio is the mean batch (`bench/peers.py`)."""
        return {"batches": self.batches, "texts": self.texts}

    async def embed(self, texts: list[str]) -> dict[str, Any]:
        """One request's texts; merged with concurrent requests into `embed_batch`."""
        return await self.batcher.submit((texts, self.lifecycle.clock()))

    async def embed_batch(self, requests: list[tuple[list[str], float]]) -> list[dict[str, Any]]:
        flat = [text for texts, _ in requests for text in texts]
        self.batch_sizes.observe(len(flat), {"model": self.config.id})
        self.batches += 1
        self.texts += len(flat)
        vectors, tokens = await self.run(self.embedder.encode, flat, arrivals=[at for _, at in requests])
        out, start = [], 0
        for texts, _ in requests:
            end = start + len(texts)
            out.append({"embeddings": vectors[start:end], "tokens": sum(tokens[start:end])})
            start = end
        return out
