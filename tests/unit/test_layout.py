"""The package's layering, checked from source: no import cycles, and the rooms import only
what sits below them (core < adapters < cluster < api < top-level app, deployments beside).

Imports are read with `ast`, lazy ones inside functions included (the router <-> probe-actor
cycle was made of lazy imports); those under `if TYPE_CHECKING:` are left out, since they never
run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("serve_app", "deployments")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    return skipped


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = all_modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "deployments":
        return "deployments"
    return parts[1] if len(parts) > 1 and parts[1] in ("core", "adapters", "cluster", "api") else "top"


#: What each room may import from the project. Top-level modules (config, errors, logs) are
#: listed by name where a lower room needs them.
ALLOWED = {
    "core": {"core", "adapters:init", "serve_app.errors"},
    "adapters": {"adapters", "serve_app.errors"},
    "cluster": {"core", "adapters", "cluster", "serve_app.config", "serve_app.errors", "serve_app.logs"},
    "api": {"api", "core", "serve_app.config", "serve_app.errors", "deployments"},
}


def test_rooms_import_only_what_sits_below_them() -> None:
    wrong = []
    for module, targets in import_graph().items():
        room = _room(module)
        allowed = ALLOWED.get(room)
        if allowed is None:
            continue
        for t in targets:
            tr = _room(t)
            ok = tr in allowed or t in allowed or (t == "serve_app.adapters" and "adapters:init" in allowed)
            if not ok:
                wrong.append(f"{module} ({room}) imports {t} ({tr})")
    assert not wrong, "\n".join(sorted(wrong))
