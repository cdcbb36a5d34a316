"""Time one placement decision for 8 GPUs x 64 instances x 32 pending requests.

The router runs `decide` on every tick and on every event (request arrival, load finished),
so it must stay far below a millisecond. The snapshot is built so every code path runs:
admits, waits behind loads in flight, eviction plans, too-big requests and idle timeouts.

    .venv/bin/python bench/policy_decide.py [--runs 5000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from serve_app.core.policy import decide
from serve_app.core.snapshot import (
    Admit,
    GpuView,
    InstanceView,
    Offload,
    PendingLoad,
    PolicyLimits,
    Release,
    Snapshot,
    Wait,
)
from serve_app.core.states import ModelState

GiB = 1024**3
MiB = 1024**2
NOW = 10_000.0


def build_snapshot(seed: int = 7, gpus: int = 8, instances: int = 64, pending: int = 32) -> Snapshot:
    rng = random.Random(seed)
    views = []
    for i in range(gpus):
        node = f"node-{i // 4}"
        views.append(GpuView(f"GPU-{i:02d}", node, i % 4, 80 * GiB, 0, 80 * GiB, name="bench"))
    states = [ModelState.GPU] * 6 + [ModelState.CPU, ModelState.LOADING, ModelState.OFFLOADING]
    insts = []
    used = dict.fromkeys((g.uuid for g in views), 0)
    for i in range(instances):
        g = views[i % gpus]
        state = rng.choice(states)
        size = rng.randrange(1, 12) * GiB
        on_gpu = state is not ModelState.CPU
        if on_gpu:
            used[g.uuid] += size
        insts.append(
            InstanceView(
                model=f"m{i:02d}",
                replica=f"r{i:02d}",
                node=g.node,
                gpu=g.uuid,
                state=state,
                bytes_gpu=size if on_gpu else 0,
                bytes_cpu=0 if on_gpu else size,
                last_used_at=NOW - rng.uniform(0, 450),
                in_flight=rng.choice([0, 0, 0, 1]),
                priority=rng.randrange(0, 3),
                idle_timeout_s=rng.choice([None, 300.0, 600.0]),
                release_timeout_s=rng.choice([None, 1800.0]),
                pinned=rng.random() < 0.1,
                # The router's per-model statistics, so the expected-cost ranking runs in full.
                request_rate_hz=rng.choice([0.0, 0.001, 0.01, 0.1, 1.0]),
                load_s=rng.choice([None, 2.0, 20.0]),
                restore_s=rng.choice([None, 0.1, 1.0]),
                next_use_at=rng.choice([None, NOW + 5.0, NOW + 600.0]),
            )
        )
    # Probe readings: ours plus a little from other processes.
    views = [
        GpuView(
            g.uuid,
            g.node,
            g.index,
            g.total_bytes,
            min(g.total_bytes, used[g.uuid] + 2 * GiB),
            g.total_bytes - min(g.total_bytes, used[g.uuid] + 2 * GiB),
            name=g.name,
        )
        for g in views
    ]
    reqs = []
    for i in range(pending):
        node = f"node-{i % 2}"
        own = [g.uuid for g in views if g.node == node]
        reqs.append(
            PendingLoad(
                request_id=f"req-{i:03d}",
                model=f"p{i:02d}",
                replica=f"pr{i:02d}",
                node=node,
                gpus=tuple(rng.sample(own, rng.randrange(1, len(own) + 1))),
                bytes_needed=rng.choice([2, 4, 8, 16, 30, 90]) * GiB,
                priority=rng.randrange(0, 3),
                enqueued_at=NOW - rng.uniform(0, 120),
            )
        )
    return Snapshot(
        gpus=tuple(views),
        instances=tuple(insts),
        pending=tuple(reqs),
        host_budget_bytes={"node-0": 64 * GiB, "node-1": 16 * GiB},
        limits=PolicyLimits(max_loads_per_gpu=2),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000)
    args = parser.parse_args()

    snapshot = build_snapshot()
    actions = decide(snapshot, NOW)
    counts = {t.__name__: sum(isinstance(a, t) for a in actions) for t in (Admit, Wait, Offload, Release)}
    for _ in range(200):  # warm up
        decide(snapshot, NOW)
    # Wall time is what a tick costs; thread CPU time leaves out preemption by other
    # processes, which dominates p99 on a busy 2-core machine.
    wall: list[int] = []
    cpu: list[int] = []
    for _ in range(args.runs):
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        decide(snapshot, NOW)
        wall.append(time.perf_counter_ns() - t0)
        cpu.append(time.thread_time_ns() - c0)
    print(
        f"decide(): {len(snapshot.gpus)} GPUs x {len(snapshot.instances)} instances x "
        f"{len(snapshot.pending)} pending -> {counts}"
    )
    for label, samples in (("wall", wall), ("cpu", cpu)):
        samples.sort()
        median_us = statistics.median(samples) / 1000
        p99_us = samples[int(len(samples) * 0.99) - 1] / 1000
        print(f"{label}: runs={args.runs} median={median_us:.1f}us p99={p99_us:.1f}us")


if __name__ == "__main__":
    main()
