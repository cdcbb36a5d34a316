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
from serve_app.cluster.replica import ModelReplica


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

    def __init__(self, adapter: TorchModuleAdapter, batch_size: int) -> None:
        self.adapter = adapter
        self.batch_size = batch_size

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
                features = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in features.items()}
                out = model(features)["sentence_embedding"].float().cpu().numpy()
                for row, i in enumerate(chunk):
                    vectors[i] = out[row]
                    tokens[i] = int(counts[row])
        return vectors, tokens


@serve.deployment
class EmbeddingsDeployment(ModelReplica):
    #: MiniLM's forward is short (about 20 ms for one sentence), and its torch threads meet at a
    #: barrier on every op: one preempted by the proxy or the client stalls the rest. On 2 cores,
    #: one thread against two, 3 interleaved rounds on the model's own route: 1-client p50
    #: 27.6/30.0/30.7 against 31.9/34.6/32.7 ms, 32-sentence requests 180/146/155 against
    #: 170/141/150 sentences/s, 8 clients 77/61/65 against 74/63/61 requests/s.
    RESERVED_CORES = 1

    def __init__(self, model: dict[str, Any], app: dict[str, Any]) -> None:
        self.batches = self.texts = 0  # before the base class starts reporting `work_stats`
        super().__init__(model, app)
        self.embedder = Embedder(self.adapter, self.config.max_batch_size)
        # Counted in texts: a request of 32 sentences is a full batch on its own.
        # Each item is a request's texts and its arrival time: a forward pass serves several
        # requests, and the router's trace must count each, not each batch.
        self.batcher: ContinuousBatcher[tuple[list[str], float], dict[str, Any]] = ContinuousBatcher(
            self.embed_batch, self.config.max_batch_size, size=lambda item: len(item[0]),
            wait_s=self.config.batch_wait_timeout_s,
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
