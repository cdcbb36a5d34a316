"""The Ray side of `core.placement`: each configured model's replica demand against the live nodes."""

from __future__ import annotations

from typing import Any

from serve_app.config import AppConfig, ModelConfig
from serve_app.core.placement import placement_problem


def replica_demand(model: ModelConfig) -> dict[str, float]:
    """What one replica of `model` asks Ray for (the ray_actor_options `app.bind_model` sets)."""
    return {"CPU": model.num_cpus, "GPU": model.num_gpus, **model.resources}


def live_node_totals() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def unschedulable_models(config: AppConfig, nodes: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """{model id: why no node can host a replica of it, and the fix}; empty when all can be placed."""
    if not config.http.check_placement:
        return {}
    totals = live_node_totals() if nodes is None else nodes
    out = {}
    for m in config.models:
        problem = placement_problem(replica_demand(m), totals)
        if problem is not None:
            out[m.id] = problem
    return out
