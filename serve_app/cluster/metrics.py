"""Router metrics, exported through Ray's metrics agent (Prometheus), so they show in the Ray
dashboard's metrics view and any Prometheus/Grafana set up for the cluster."""

from __future__ import annotations

from typing import Any

STATES = ("unloaded", "loading", "gpu", "offloading", "cpu", "restoring", "releasing")


class RouterMetrics:
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.gpu_used = Gauge("gpu_serve_gpu_used_bytes", "GPU memory in use", tag_keys=("gpu", "node"))
        self.gpu_free = Gauge(
            "gpu_serve_gpu_free_bytes", "GPU memory free after the safety margin", tag_keys=("gpu", "node")
        )
        self.instances = Gauge("gpu_serve_model_instances", "Model instances per state", tag_keys=("model", "state"))
        self.model_gpu = Gauge("gpu_serve_model_gpu_bytes", "GPU bytes held per model", tag_keys=("model",))
        self.model_cpu = Gauge("gpu_serve_model_cpu_bytes", "Host bytes held per model", tag_keys=("model",))
        self.queue = Gauge("gpu_serve_load_queue_length", "Loads waiting for GPU memory")
        self.admissions = Counter("gpu_serve_admissions_total", "Loads and restores admitted", tag_keys=("model",))
        self.evictions = Counter(
            "gpu_serve_evictions_total", "Offloads and releases the policy ordered", tag_keys=("model", "kind")
        )
        self.admission_wait = Histogram(
            "gpu_serve_admission_wait_seconds", "Time a load waited for GPU memory",
            boundaries=[0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60], tag_keys=("model",),
        )
        self.audit_misses = Gauge(
            "gpu_serve_policy_audit_gpu_misses", "GPU misses (loads + restores) in the audit window"
        )
        self.audit_belady = Gauge(
            "gpu_serve_policy_audit_belady_misses", "Belady-Size's misses on the same requests and capacity"
        )
        self.audit_ratio = Gauge("gpu_serve_policy_audit_ratio", "Live GPU misses over Belady-Size's")

    def observe(self, status: dict[str, Any]) -> None:
        for g in status["gpus"]:
            tags = {"gpu": g["uuid"], "node": g["node"][:12]}
            self.gpu_used.set(g["used_bytes"], tags)
            self.gpu_free.set(g["free_bytes"], tags)
        counts: dict[tuple[str, str], int] = {}
        held: dict[str, tuple[int, int]] = {}
        for m in status["models"]:
            if m["replica"] is not None:
                counts[(m["model"], m["state"])] = counts.get((m["model"], m["state"]), 0) + 1
            gpu, cpu = held.get(m["model"], (0, 0))
            held[m["model"]] = (gpu + int(m["bytes_gpu"] or 0), cpu + int(m["bytes_cpu"] or 0))
        for model, (gpu, cpu) in held.items():
            self.model_gpu.set(gpu, {"model": model})
            self.model_cpu.set(cpu, {"model": model})
            for state in STATES:
                self.instances.set(counts.get((model, state), 0), {"model": model, "state": state})
        self.queue.set(len(status["queue"]))
        audit = status.get("policy_audit")
        if audit:
            self.audit_misses.set(audit["gpu_misses"])
            self.audit_belady.set(audit["belady_misses"])
            if audit.get("ratio") is not None:
                self.audit_ratio.set(audit["ratio"])
