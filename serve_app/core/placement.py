"""Can Ray place a replica anywhere? A pure check of one replica's resource demand against the
total resources of the live nodes.

Why: Serve waits forever for a replica no node can host (`serve run serve_config.yaml` on a
cluster without GPUs: the Ray autoscaler logs "No available node types can fulfill resource
request" and the request hangs). The ingress answers such requests with a 503 naming the
missing resource and the fix instead, within seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: Shown when no node offers a GPU at all: the usual cause is a CPU machine started by hand.
NO_GPU_FIX = (
    "this cluster has no GPUs; run `python -m serve_app run`, which declares logical GPUs on a machine "
    "without one, or start Ray with `ray start --num-gpus N`, or add GPU nodes"
)


def _fmt(amount: float) -> str:
    return f"{amount:g}"


def placement_problem(demand: Mapping[str, float], nodes: Iterable[Mapping[str, float]]) -> str | None:
    """None when some node's totals cover every resource in `demand`; else why not, and the fix."""
    wanted = {k: float(v) for k, v in demand.items() if v and v > 0}
    totals = [dict(n) for n in nodes]
    if any(all(n.get(k, 0.0) >= v for k, v in wanted.items()) for n in totals):
        return None
    if not totals:
        return "the cluster has no live nodes; start Ray (`python -m serve_app run` does) and retry"
    # Name the first resource that no node offers in the amount asked, GPUs first.
    for key in sorted(wanted, key=lambda k: (k != "GPU", k != "CPU", k)):
        best = max(n.get(key, 0.0) for n in totals)
        if best >= wanted[key]:
            continue
        if key == "GPU":
            if best == 0:
                return f"no node offers GPU {_fmt(wanted[key])}: {NO_GPU_FIX}"
            return (
                f"no node offers GPU {_fmt(wanted[key])} (the most on one node is {_fmt(best)}); "
                "lower the model's num_gpus or add a node with more GPUs"
            )
        offered = sorted({k for n in totals for k in n if not k.startswith("node:") and "_group_" not in k})
        return (
            f"no node offers {key} {_fmt(wanted[key])} (the most on one node is {_fmt(best)}; nodes offer: "
            f"{', '.join(offered)}); give a node that resource (`ray start --resources`) or change the "
            "model's num_cpus/resources"
        )
    return (
        f"no single node offers all of {', '.join(f'{k} {_fmt(v)}' for k, v in sorted(wanted.items()))} together; "
        "lower the model's num_gpus/num_cpus or add a larger node"
    )
