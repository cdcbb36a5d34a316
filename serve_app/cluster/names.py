"""Names of the cluster's named actors, and lookups that need no actor class.

Kept apart from the actor modules so that an actor can find another by name without
importing it: the router starts the probes, and a probe finds the router here.
"""

from __future__ import annotations

from typing import Any

ROUTER_NAME = "gpu-serve-router"
#: A routed model's own application answers under this prefix, then the model id
#: (`serve_app/routed.py`; HAProxy's body routes rewrite to it, `cluster/body_routes.py`).
ROUTE_ROOT = "/models"


def deployment_name(model_id: str) -> str:
    """The Serve deployment name of a model: what handles look it up by."""
    return "model-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in model_id)


def probe_name(node_id: str) -> str:
    return f"gpu-serve-probe-{node_id}"


def lookup_router(namespace: str) -> Any:
    """The running router actor's handle; raises ValueError while it does not exist yet."""
    import ray

    return ray.get_actor(ROUTER_NAME, namespace=namespace)
