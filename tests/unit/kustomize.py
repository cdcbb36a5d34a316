"""A small kustomize: the features the manifests in k8s/ use, and an error for any other.

The tests render base + overlay with it on any machine (no kustomize binary needed); where
`kubectl` is installed, test_k8s.py also compares it with `kubectl kustomize`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import yaml

SUPPORTED = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}


def render(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise NotImplementedError(f"{directory}: kustomization fields this renderer lacks: {sorted(unknown)}")
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    if "namespace" in kustomization:
        for doc in docs:
            doc.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for patch in kustomization.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        if not isinstance(ops, list):
            raise NotImplementedError(f"{patch['path']}: only JSON 6902 patches (a list of operations)")
        hits = [i for i, doc in enumerate(docs) if _matches(doc, patch["target"])]
        if not hits:
            raise ValueError(f"patch {patch['path']} matches no resource: {patch['target']}")
        for i in hits:
            docs[i] = jsonpatch.apply_patch(docs[i], ops)
    for image in kustomization.get("images", []):
        _set_image(docs, image)
    return copy.deepcopy(docs)


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}
    return all(wanted[k] == v for k, v in target.items())


def _set_image(node: Any, image: dict[str, str]) -> None:
    """Like kustomize's image transformer: every container anywhere, CRDs included."""
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name = container.get("image", "").split("@")[0].rsplit(":", 1)[0]
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
        _set_image(value, image)
