"""The tutorials in colabs/ run top to bottom, so they never rot.

Each notebook is executed headless with nbclient in a kernel started from this interpreter,
with cwd = colabs/ and this checkout first on PYTHONPATH (so a notebook tests the code next
to it, not some other installed copy). The kernel inherits XLA_FLAGS from tests/conftest.py
(8 simulated CPU devices, -O0). A failing ``assert`` in a cell fails the test.

The stored notebooks must be clean: no outputs, no execution counts, the python3 kernelspec,
and an "Open in Colab" badge pointing at their own path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
COLABS = ROOT / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/attnjax/attnjax/blob/main/colabs/{name})")
_PROBE = "import sys as _sys\nprint('KERNEL-PYTHON', _sys.executable)"


def _code(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", nb.metadata
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {i} has outputs: strip them"
    assert BADGE.format(name=path.name) in nb.cells[0].source, "first cell needs the Colab badge"
    code = _code(nb)
    assert "%pip install" in code and "except ImportError" in code, "needs the Colab install cell"
    assert "plt." in code, "needs at least one plot"
    assert "assert " in code, "needs at least one check against a reference"


def _repository() -> str:
    """The repository URL: pyproject.toml's [project.urls] Repository, else the one the Colab
    badges point at."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    url = project.get("urls", {}).get("Repository")
    if url is None:
        url = "https://github.com/" + re.search(r"colab.research.google.com/github/([^/]+/[^/]+)/", BADGE)[1]
    return url.rstrip("/").removesuffix(".git")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_keeps_the_runtime_jax(path):
    """Colab's install cell installs attnjax from the project's repository with the runtime's
    jax and jaxlib pinned as constraints (an upgrade would swap a GPU/TPU build for a CPU one)."""
    nb = nbformat.read(path, as_version=4)
    cell = next(c.source for c in nb.cells if c.cell_type == "code" and "%pip install" in c.source)
    pip = next(line.strip() for line in cell.splitlines() if line.strip().startswith("%pip install"))
    assert f'"attnjax @ git+{_repository()}"' in pip, pip
    assert " -c " in pip and '("jax", "jaxlib")' in cell and "metadata.version(name)" in cell, cell
    assert "-U" not in pip.split() and "--upgrade" not in pip, pip


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_sections_are_numbered_in_order(path):
    import re

    nb = nbformat.read(path, as_version=4)
    heads = [line for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines()
             if line.startswith("## ")]
    numbers = [int(m[1]) for h in heads if (m := re.match(r"## (\d+)\.", h))]
    assert numbers == list(range(1, len(numbers) + 1)), heads


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_PROBE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(COLABS)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any failure

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    # The "python3" kernel must be this interpreter (jupyter_client maps the kernelspec's bare
    # "python" to sys.executable), else the notebook would test another environment.
    assert f"KERNEL-PYTHON {sys.executable}" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot was drawn"
