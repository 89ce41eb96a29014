"""The package layout shows the layers: imports only point down, no cycles, no private helpers across files."""

from __future__ import annotations

import ast
from pathlib import Path

import vlmad

ROOT = Path(vlmad.__file__).parent
# Lower index = lower layer. A module may import its own layer and the ones below, never above.
LAYERS = ["base", "data", "backbones", "methods", "metrics", "outputs", "engine", "deploy", "top"]
CROSS_CUTTING = {"errors", "io", "config", "logs", "_lazy", "__init__"}
TOP = {"cli", "demo", "bench", "__main__"}


def _layer(module: str) -> int:
    """Layer index of a dotted vlmad module name."""
    parts = module.split(".")
    if len(parts) == 1:
        return LAYERS.index("top")  # the package root re-exports lazily
    head = parts[1]
    if head in CROSS_CUTTING:
        return 0
    if head in TOP:
        return LAYERS.index("top")
    return LAYERS.index(head)


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        out[".".join(["vlmad", *rel.parts])] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[str, list[str]]]:
    """(imported vlmad module, imported names) for every import, top level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlmad"):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("vlmad")]
    return out


def test_flat_modules_are_only_cross_cutting_or_entry_points():
    flat = {p.stem for p in ROOT.glob("*.py")}
    assert flat <= CROSS_CUTTING | TOP, f"flat modules outside the layers: {sorted(flat - CROSS_CUTTING - TOP)}"
    subpackages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subpackages <= set(LAYERS) | TOP, sorted(subpackages)


def test_imports_only_point_down():
    bad = []
    for module, path in _modules().items():
        for target, names in _imports(path, module):
            # `from vlmad import deploy` / `from vlmad.deploy import runtime` import a module: judge that module
            candidates = [f"{target}.{n}" for n in names if f"{target}.{n}" in _modules()] or [target]
            for imported in candidates:
                if imported == "vlmad":
                    continue
                if _layer(imported) > _layer(module):
                    bad.append(f"{module} -> {imported}")
    assert not bad, "imports pointing up a layer:\n" + "\n".join(bad)


def test_no_private_helper_used_across_files():
    bad = []
    for module, path in _modules().items():
        for target, names in _imports(path, module):
            if target != module:
                bad += [f"{module} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    modules = _modules()
    for module, path in modules.items():
        deps = set()
        for target, names in _imports(path, module):
            deps |= {f"{target}.{n}" for n in names if f"{target}.{n}" in modules} or {target}
        graph[module] = {d for d in deps if d in modules and d != module and not d.endswith("__init__")}
    seen, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append([*stack[stack.index(node) :], node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for dep in graph.get(node, ()):
            visit(dep)
        stack.pop()

    for node in graph:
        visit(node)
    cycles = [c for c in cycles if not any(m in ("vlmad", "vlmad.__init__") for m in c)]
    assert not cycles, cycles
