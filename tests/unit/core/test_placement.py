"""Can Ray place a replica anywhere: the pure check and its messages."""

from __future__ import annotations

from serve_app.core.placement import placement_problem

CPU_ONLY = [{"CPU": 2.0, "memory": 1e9, "node:10.0.0.1": 1.0}]
GPU_NODES = [{"CPU": 2.0}, {"CPU": 2.0, "GPU": 2.0, "node_a": 100.0}]


def test_a_node_that_covers_the_demand_places_it() -> None:
    assert placement_problem({"CPU": 0.25, "GPU": 0.25}, GPU_NODES) is None
    assert placement_problem({"CPU": 0.25, "GPU": 0.25, "node_a": 1}, GPU_NODES) is None
    assert placement_problem({"CPU": 0.25, "GPU": 0}, CPU_ONLY) is None, "zero demands are no demand"


def test_no_gpu_in_the_cluster_names_the_fix() -> None:
    reason = placement_problem({"CPU": 0.25, "GPU": 0.25}, CPU_ONLY)
    assert reason is not None
    assert reason.startswith("no node offers GPU 0.25: this cluster has no GPUs")
    assert "python -m serve_app run" in reason


def test_too_large_a_gpu_share_or_a_missing_custom_resource() -> None:
    reason = placement_problem({"GPU": 3}, GPU_NODES)
    assert reason is not None and "the most on one node is 2" in reason and "num_gpus" in reason
    reason = placement_problem({"CPU": 0.25, "GPU": 0.25, "nowhere": 1}, GPU_NODES)
    assert reason is not None and reason.startswith("no node offers nowhere 1")
    assert "node_a" in reason and "node:" not in reason


def test_resources_split_over_nodes_do_not_add_up() -> None:
    nodes = [{"CPU": 4.0}, {"GPU": 1.0, "CPU": 0.0}]
    reason = placement_problem({"CPU": 1, "GPU": 1}, nodes)
    assert reason is not None and "no single node" in reason


def test_no_nodes() -> None:
    assert "no live nodes" in (placement_problem({"CPU": 1}, []) or "")
