"""Shared test configuration: the `gpu` marker skips without CUDA."""

from __future__ import annotations

import pytest


def _cuda_available() -> bool:
    from serve_app.cluster.gpu import nvml_gpu_count

    return nvml_gpu_count() > 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (NVML found none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
