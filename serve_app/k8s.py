"""The KubeRay manifests' generated part, and the GPU worker's memory plan.

`make k8s` (`python -m serve_app.k8s`) writes the RayService's `serveConfigV2` block in
`k8s/base/rayservice.yaml` from `serve_config.yaml`, so the models are listed once (there, and
split into the applications `python -m serve_app run` deploys). Only what a cluster needs
changes: proxies listen on 0.0.0.0 (pods are reached by their IP) on every node that runs a
replica, not only on the head (each GPU worker serves its own traffic), and the models' cache
(`HF_HOME`) moves onto the models volume. The rest of the manifest is written by hand;
`--check` fails when the committed block and a fresh one differ.

The worker's memory limit and the CPU tier's budget are tied by `hostmem.host_budget_bytes`:
`router.host_ram_budget_bytes: null` gives the CPU tier half of the pod's memory limit (the
probe reads the cgroup limit), and :func:`worker_fit` checks that the other half holds the
object store, the replicas that fit on one node and the node's own processes.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from serve_app.cluster.hostmem import host_budget_bytes
from serve_app.config import AppConfig, HttpConfig, parse_app_config

SERVE_CONFIG = Path("serve_config.yaml")
MANIFEST = Path("k8s/base/rayservice.yaml")
#: Where the models volume is mounted in the GPU workers, and the cache on it.
MODELS_MOUNT = "/models"
HF_HOME = f"{MODELS_MOUNT}/huggingface"

GiB = 1024**3
MiB = 1024**2
#: Host RAM one model replica needs besides the weights it offloads. Measured: 474 MiB max RSS
#: after importing torch, sentence-transformers, faster-whisper and the replica base (CPU, no
#: CUDA); a CUDA context adds host memory on top, so 1 GiB is allowed.
REPLICA_HOST_BYTES = 1 * GiB
#: The node's own processes: raylet, dashboard agent, the Serve proxy (about 136 MiB measured),
#: the probe actor and log monitor.
NODE_OVERHEAD_BYTES = 1 * GiB


#: The names of KubeRay's Serve service for the RayService `gpu-serve` in namespace `gpu-serve`.
SERVE_SERVICE_HOSTS = (
    "gpu-serve-serve-svc:*", "gpu-serve-serve-svc.gpu-serve.svc:*", "gpu-serve-serve-svc.gpu-serve.svc.cluster.local:*",
)


def cluster_serve_config(local: dict[str, Any]) -> dict[str, Any]:
    """`serve_config.yaml` with what a cluster needs changed, and nothing else."""
    config = copy.deepcopy(local)
    config["proxy_location"] = "EveryNode"
    config.setdefault("http_options", {})["host"] = "0.0.0.0"
    for app in config.get("applications", []):
        env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
        env["HF_HOME"] = HF_HOME
        # /mcp checks the Host header (DNS rebinding): in the cluster clients use the Serve service's names.
        http = app.setdefault("args", {}).setdefault("http", {})
        http.setdefault("mcp_allowed_hosts", [*HttpConfig().mcp_allowed_hosts, *SERVE_SERVICE_HOSTS])
    return config


def render_serve_config_v2(local: dict[str, Any]) -> str:
    """The cluster's config, split as `python -m serve_app run` deploys it: each embeddings and
    speech model in an application of its own at /models/{id} (`serve_app.app.split_serve_config`)."""
    from serve_app.app import split_serve_config

    return yaml.safe_dump(split_serve_config(cluster_serve_config(local)), sort_keys=False, width=100)


_BLOCK = re.compile(r"^(?P<indent> *)serveConfigV2: \|\n", re.MULTILINE)


def splice_serve_config(manifest: str, body: str) -> str:
    """Replace the literal block after `serveConfigV2: |` with `body`, keeping the rest as written."""
    match = _BLOCK.search(manifest)
    if match is None:
        raise ValueError("the manifest has no 'serveConfigV2: |' block to fill")
    key_indent = len(match["indent"])
    lines = manifest[match.end() :].splitlines(keepends=True)
    end = 0
    while end < len(lines):
        line = lines[end]
        if line.strip() and len(line) - len(line.lstrip(" ")) <= key_indent:
            break
        end += 1
    pad = " " * (key_indent + 2)
    block = "".join(pad + line + "\n" for line in body.rstrip("\n").split("\n"))
    return manifest[: match.end()] + block + "".join(lines[end:])


def generate(serve_config: Path = SERVE_CONFIG, manifest: Path = MANIFEST) -> str:
    """The manifest's text with a freshly generated serveConfigV2."""
    local = yaml.safe_load(serve_config.read_text())
    return splice_serve_config(manifest.read_text(), render_serve_config_v2(local))


# --- the GPU worker's memory plan -------------------------------------------------------------

_SUFFIX = {
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4,
    "k": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "m": 0.001, "": 1,
}


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("24Gi", "500m", "6") as a number."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    if match is None or match[2] not in _SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(match[1]) * _SUFFIX[match[2]]


@dataclass(frozen=True)
class WorkerShape:
    """What one GPU worker pod gives Ray."""

    memory_limit_bytes: int
    cpus: float
    gpus: int
    object_store_bytes: int

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> WorkerShape:
        (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
        limits = container["resources"]["limits"]
        return cls(
            memory_limit_bytes=int(parse_quantity(limits["memory"])),
            cpus=parse_quantity(limits["cpu"]),
            gpus=int(parse_quantity(limits["nvidia.com/gpu"])),
            object_store_bytes=int(group["rayStartParams"]["object-store-memory"]),
        )


def replicas_per_node(app: AppConfig, gpus: int) -> list[tuple[str, float]]:
    """The most model replicas one node can hold (by their GPU fractions), as (model, num_cpus)."""
    candidates = sorted(
        ((m.num_gpus, m.id, m.num_cpus) for m in app.models for _ in range(m.autoscaling.max_replicas)),
    )
    placed: list[tuple[str, float]] = []
    used = 0.0
    for num_gpus, model_id, num_cpus in candidates:
        if used + num_gpus <= gpus + 1e-9:
            used += num_gpus
            placed.append((model_id, num_cpus))
    return placed


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    object_store_bytes: int
    replicas_bytes: int
    node_bytes: int
    limit_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.budget_bytes + self.object_store_bytes + self.replicas_bytes + self.node_bytes


def memory_plan(app: AppConfig, worker: WorkerShape) -> MemoryPlan:
    replicas = len(replicas_per_node(app, worker.gpus)) + app.http.num_replicas  # ingress may land here
    return MemoryPlan(
        budget_bytes=host_budget_bytes(app.router.host_ram_budget_bytes, worker.memory_limit_bytes),
        object_store_bytes=worker.object_store_bytes,
        replicas_bytes=replicas * REPLICA_HOST_BYTES,
        node_bytes=NODE_OVERHEAD_BYTES,
        limit_bytes=worker.memory_limit_bytes,
    )


def worker_fit(app: AppConfig, worker: WorkerShape) -> list[str]:
    """Why this worker cannot hold a full node of replicas and its CPU tier; empty when it can."""
    problems = []
    plan = memory_plan(app, worker)
    if plan.total_bytes > plan.limit_bytes:
        problems.append(
            f"GPU worker memory limit {plan.limit_bytes / GiB:.1f} GiB is below the plan's "
            f"{plan.total_bytes / GiB:.1f} GiB: CPU tier {plan.budget_bytes / GiB:.1f} GiB "
            f"(router.host_ram_budget_bytes={app.router.host_ram_budget_bytes}) + object store "
            f"{plan.object_store_bytes / GiB:.1f} GiB + replicas {plan.replicas_bytes / GiB:.1f} GiB + node "
            f"{plan.node_bytes / GiB:.1f} GiB; raise the worker's memory or lower the budget"
        )
    placed = replicas_per_node(app, worker.gpus)
    cpus = sum(c for _, c in placed) + app.http.num_cpus * app.http.num_replicas
    if cpus > worker.cpus:
        problems.append(
            f"GPU worker has {worker.cpus:g} CPUs but a full node of replicas asks Ray for {cpus:g} "
            f"({len(placed)} model replicas and the ingress); raise the worker's cpu or lower num_cpus"
        )
    return problems


def check_manifest(text: str) -> list[str]:
    """The memory plan of every worker group in a RayService manifest."""
    service = yaml.safe_load(text)
    app = parse_app_config(yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"])
    problems = []
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        problems += [f"{group['groupName']}: {p}" for p in worker_fit(app, WorkerShape.from_group(group))]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.k8s", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed manifest is stale")
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG)
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    args = parser.parse_args(argv)
    fresh = generate(args.serve_config, args.manifest)
    problems = check_manifest(fresh)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    if fresh == args.manifest.read_text():
        print(f"{args.manifest} is up to date")
        return 0
    if args.check:
        print(f"{args.manifest} differs from {args.serve_config}; run: make k8s", file=sys.stderr)
        return 1
    args.manifest.write_text(fresh)
    print(f"wrote serveConfigV2 of {args.manifest} from {args.serve_config}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
