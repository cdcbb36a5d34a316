"""gpu-serve: GPU memory management for Ray Serve deployments.

`serve_app.ManagedModel` (the public base class of a user's own deployment) is imported on
first use, so that importing the package stays cheap (no Ray, no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve_app.managed import ManagedModel, ModelRef, deployment

__all__ = ["ManagedModel", "ModelRef", "deployment"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from serve_app import managed

        return getattr(managed, name)
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
