"""How much host RAM a node may give the CPU tier.

In a container, `sysconf(SC_PHYS_PAGES)` reports the machine's RAM, not the container's memory
limit: on a Kubernetes GPU node with 256 GiB and a pod limited to 24 GiB, "half of the node's
RAM" would be 128 GiB, and offloading into it would get the pod OOM-killed. The memory Ray may
use is the smaller of the physical RAM and the cgroup limit (v2 `memory.max`, v1
`memory.limit_in_bytes`), so the pod's memory limit is what sets the budget by default.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: cgroup v1 writes "no limit" as a page-aligned LONG_MAX; anything this large means unlimited.
_UNLIMITED = 1 << 60


def cgroup_limit_bytes(root: Path = CGROUP_ROOT) -> int | None:
    """The memory limit of this process's cgroup, or None where there is none."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if value < _UNLIMITED else None
    return None


def physical_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def usable_bytes(root: Path = CGROUP_ROOT) -> int:
    """RAM this node's processes may use: physical RAM, capped by the cgroup limit."""
    physical = physical_bytes()
    limit = cgroup_limit_bytes(root)
    if limit is None:
        return physical
    return min(limit, physical) if physical else limit


def host_budget_bytes(configured: int | None, usable: int) -> int:
    """The CPU tier's budget: the configured value, else half of what the node may use.

    The other half is left for what is not offloaded weights: Ray's object store, the replica
    processes (each imports torch) and the raylet. The KubeRay manifests check that split
    against the GPU worker's memory limit with this same function.
    """
    return configured if configured is not None else usable // 2
