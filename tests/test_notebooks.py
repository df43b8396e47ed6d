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
