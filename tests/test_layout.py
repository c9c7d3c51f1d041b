"""The package's imports follow the data: no circle, every import points down the
layers, and mergekit is imported in the integration folder alone.

Imports are read with ``ast`` from the source (those inside functions included, since
a deferred import is still a dependency), so the check needs no import side effects.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mergekit_fw"

# Bottom to top. A module may import its own layer (acyclically) and the layers below.
LAYERS: List[List[str]] = [
    ["mergekit_fw", "mergekit_fw.config", "mergekit_fw.files", "mergekit_fw.distributed", "mergekit_fw.interrupts"],
    ["mergekit_fw.pool"],
    ["mergekit_fw.calibration", "mergekit_fw.objective", "mergekit_fw.merge_fn"],
    ["mergekit_fw.oracle"],
    ["mergekit_fw.solve"],
    ["mergekit_fw.output", "mergekit_fw.evaluation"],
    ["mergekit_fw.integration"],
    ["mergekit_fw.cli"],
]
INTEGRATION = "mergekit_fw.integration"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = PACKAGE) -> Dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imported(path: Path, known: Set[str], package: str) -> Set[str]:
    """The package modules and outside top-level packages that ``path`` imports."""
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import (use absolute {package}. imports)")
            base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {name for name in out if name in known or not name.startswith(package)}


def graph(root: Path = PACKAGE) -> Dict[str, Set[str]]:
    found = modules(root)
    package = root.name
    return {name: imported(path, set(found), package) for name, path in found.items()}


def layer_of(module: str) -> int:
    for rank, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members if m != "mergekit_fw"):
            return rank
    if module == "mergekit_fw":
        return 0
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected component with more than one module (or a self-import)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in edges:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    assert cycles(graph()) == []


def test_imports_point_down_the_layers():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph().items()
        for target in targets
        if target.startswith("mergekit_fw") and layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_mergekit_is_imported_by_the_integration_folder_alone():
    outside = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if (target == "mergekit" or target.startswith("mergekit."))
        and not (module == INTEGRATION or module.startswith(INTEGRATION + "."))
    ]
    assert outside == []


def test_every_folder_is_a_package_that_says_its_job():
    folders = {path.parent for path in PACKAGE.rglob("*.py")}
    for folder in sorted(folders):
        init = folder / "__init__.py"
        assert init.is_file(), f"{folder} has no __init__.py (a namespace package by accident)"
        docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert docstring, f"{init} has no docstring saying what the folder is for"


# --- the checks can fail -------------------------------------------------------------


def _write(root: Path, files: Dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


def test_a_circle_through_a_deferred_import_is_found(tmp_path):
    package = _write(tmp_path, {
        "pkg/__init__.py": '"""p"""\n',
        "pkg/a.py": "from pkg.b import x\n",
        "pkg/b.py": "def x():\n    from pkg import c\n",
        "pkg/c.py": "import pkg.a\n",
    })
    assert cycles(graph(package)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_a_module_imported_from_its_package_counts_as_the_module(tmp_path):
    package = _write(tmp_path, {
        "pkg/__init__.py": '"""p"""\n',
        "pkg/sub/__init__.py": '"""s"""\n',
        "pkg/sub/leaf.py": "import mergekit.config\n",
        "pkg/top.py": "from pkg.sub import leaf\n",
    })
    edges = graph(package)
    assert edges["pkg.top"] == {"pkg.sub.leaf"}
    assert edges["pkg.sub.leaf"] == {"mergekit.config"}


def test_an_unplaced_module_is_reported():
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("mergekit_fw.somewhere_new")
