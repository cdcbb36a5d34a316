"""The Grafana dashboard queries only series the service exports, and charts the ones the
issue asks for."""

from __future__ import annotations

import json
import re
from pathlib import Path

from serve_app.cluster.metrics import EXPORTED

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "dashboards" / "gpu-serve.json"
SERIES = re.compile(r"\b(ray_gpu_serve_[a-z_]+)")
SUFFIXES = ("_bucket", "_sum", "_count")


def queried() -> dict[str, set[str]]:
    doc = json.loads(DASHBOARD.read_text())
    out: dict[str, set[str]] = {}
    for panel in doc["panels"]:
        for target in panel["targets"]:
            out.setdefault(panel["title"], set()).update(SERIES.findall(target["expr"]))
    for var in doc["templating"]["list"]:
        out.setdefault("$" + var["name"], set()).update(SERIES.findall(str(var.get("query", ""))))
    return out


def base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_queried_series_is_exported() -> None:
    unknown = {f"{where}: {name}" for where, names in queried().items() for name in names if base(name) not in EXPORTED}
    assert not unknown, sorted(unknown)


def test_histograms_are_queried_through_their_buckets_sum_or_count() -> None:
    histograms = {"ray_gpu_serve_admission_wait_seconds", "ray_gpu_serve_transition_seconds",
                  "ray_gpu_serve_embeddings_batch_size"}
    bare = {n for names in queried().values() for n in names if n in histograms}
    assert not bare, bare


def test_the_panels_the_issue_names_are_there() -> None:
    titles = " | ".join(queried()).lower()
    for words in ("memory by model", "states over time", "queue length", "queue wait", "transition", "evictions"):
        assert words in titles, words
    doc = json.loads(DASHBOARD.read_text())
    stacked = [p for p in doc["panels"] if p["title"].startswith("GPU memory by model")]
    assert stacked[0]["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"


def test_the_declared_list_matches_the_metrics_module() -> None:
    """`EXPORTED` is the contract: every metric the code creates is in it (checked from source)."""
    src = (Path(__file__).resolve().parents[2] / "serve_app" / "cluster" / "metrics.py").read_text()
    created = set(re.findall(r'(?:Gauge|Counter|Histogram)\(\s*"(gpu_serve_[a-z_]+)"', src))
    names = {"ray_" + n for n in created}  # counters are named with their `_total` already
    assert names == set(EXPORTED)
