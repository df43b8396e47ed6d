"""The package's layering, enforced by walking its imports (no code is run).

* ``attnjax.core`` imports nothing from the rest of attnjax (but input checks, ``_checks``);
* ``kernels_pallas`` never imports ``attnjax.ops``, ``attnjax.nn`` or ``attnjax.parallel``;
* no import cycle among attnjax's modules (module-level imports; lazy ones inside functions and
  ``TYPE_CHECKING`` blocks are not load-time edges);
* no private name crosses a module boundary (``from m import _x`` or ``m._x`` with ``m`` another
  module); private *modules* (``_checks``) are package-internal helpers and may be imported;
* every op family has ``api.py``, ``reference.py`` and ``xla.py``;
* test files do not import each other (shared machinery lives in ``tests/harness.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attnjax", "kernels_pallas")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(*packages: str) -> dict[str, Path]:
    return {_module_name(p): p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules(*PACKAGES)


def _walk(tree: ast.Module, top_level_only: bool):
    """The statements of a module, skipping ``if TYPE_CHECKING:`` blocks; with
    ``top_level_only``, only those that run at import time (not inside functions)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports(path: Path, module: str, *, top_level_only: bool):
    """``(target module, imported name or None, line)`` for each import in ``path``."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _walk(tree, top_level_only):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub, None, node.lineno) if sub in MODULES else (base, alias.name, node.lineno)


def test_core_imports_nothing_above_it():
    bad = [f"{m}:{line} imports {target}" for m, p in MODULES.items() if m.startswith("attnjax.core")
           for target, _, line in _imports(p, m, top_level_only=False)
           if target.startswith("attnjax") and not target.startswith(("attnjax.core", "attnjax._checks"))]
    assert not bad, "\n".join(bad)


def test_kernels_never_import_ops():
    above = ("attnjax.ops", "attnjax.nn", "attnjax.parallel", "attnjax.analysis")
    bad = [f"{m}:{line} imports {target}" for m, p in MODULES.items() if m.startswith("kernels_pallas")
           for target, _, line in _imports(p, m, top_level_only=False) if target.startswith(above)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, _ in _imports(p, m, top_level_only=True) if t in MODULES and t != m})
             for m, p in MODULES.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in graph[m]:
            # A module importing its own package's __init__ runs it first; that is not a cycle
            # unless the __init__ imports the module back, which the walk then finds.
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_no_private_names_cross_modules():
    bad = []
    for m, p in _modules(*PACKAGES, "experiments").items():
        tree = ast.parse(p.read_text())
        module_aliases = set()
        for target, name, line in _imports(p, m, top_level_only=False):
            if name is not None and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{m}:{line} imports private {name} from {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                module_aliases.update(a.asname or a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                module_aliases.update(a.asname or a.name for a in node.names
                                      if f"{node.module}.{a.name}" in MODULES)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{m}:{node.lineno} uses private {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("family", ["attention", "lightning", "linear", "neighborhood"])
def test_op_family_has_the_standard_files(family):
    folder = ROOT / "attnjax" / "ops" / family
    missing = [f for f in ("__init__.py", "api.py", "reference.py", "xla.py") if not (folder / f).exists()]
    assert not missing, f"ops/{family} lacks {missing}"


def test_op_files_stay_small():
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in (ROOT / "attnjax").rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 600]
    assert not big, "\n".join(big)


def test_test_files_do_not_import_each_other():
    bad = []
    for p in sorted((ROOT / "tests").rglob("test_*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module
                     else [])
            bad += [f"{p.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                    if any(part.startswith("test_") for part in n.split(".")[1:])]
    assert not bad, "\n".join(bad)
