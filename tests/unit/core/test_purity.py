"""`serve_app/core` is pure: it imports no Ray, torch, CTranslate2, transformers, faster-whisper
or pynvml, so decisions are unit tested without them and the policy runs anywhere (the simulator).

The check runs in a fresh interpreter whose import system refuses those packages, then imports
every module under `serve_app/core/`.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import serve_app.core

HEAVY = ("ray", "torch", "ctranslate2", "transformers", "sentence_transformers", "faster_whisper", "pynvml")

PROGRAM = """
import importlib, importlib.abc, sys

BLOCKED = {blocked!r}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"core must not import {{name}}")
        return None

sys.meta_path.insert(0, Refuse())
for module in {modules!r}:
    importlib.import_module(module)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("imported", len({modules!r}), "modules")
"""


def core_modules() -> list[str]:
    root = Path(serve_app.core.__file__).parent
    return ["serve_app.core"] + [f"serve_app.core.{m.name}" for m in pkgutil.iter_modules([str(root)])]


def test_core_has_the_decision_modules() -> None:
    names = set(core_modules())
    expected = {"states", "lifecycle", "snapshot", "policy"}
    assert {f"serve_app.core.{m}" for m in expected} <= names


def test_every_core_module_imports_without_heavy_packages() -> None:
    modules = core_modules()
    program = PROGRAM.format(blocked=HEAVY, modules=modules)
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"imported {len(modules)} modules" in out.stdout


def test_the_refusal_works() -> None:
    """The guard itself must catch a heavy import, or the test above proves nothing."""
    program = PROGRAM.format(blocked=HEAVY, modules=["serve_app.cluster.metrics", "ray"])
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "core must not import ray" in out.stderr
