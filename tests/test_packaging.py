"""What a wheel built from the repository installs (docs/design.md, "Packaging"): only ``attnjax``
at the top level, with the kernels and experiments inside it, ``py.typed``, the licence, one
version; and, in a fresh virtual environment, the demo by config name.

The wheel is built offline (``--no-build-isolation --no-index``: setuptools comes with the test
extra) from a copy of the repository, so the checkout gets no ``build/`` or ``*.egg-info``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import attnjax

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".*", "build", "dist", "runs", "*.egg-info", "__pycache__")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = Path(shutil.copytree(ROOT, tmp / "src", ignore=IGNORE))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (built,) = (tmp / "dist").glob("attnjax-*.whl")
    return built


def test_the_wheel_installs_only_attnjax(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"attnjax", f"attnjax-{attnjax.__version__}.dist-info"}, tops
    for path in ("attnjax/py.typed", "attnjax/kernels_pallas/flash/kernel.py", "attnjax/experiments/train.py",
                 "attnjax/experiments/configs/tiny_charlm.py", "attnjax/experiments/bench/common.py",
                 f"attnjax-{attnjax.__version__}.dist-info/licenses/LICENSE"):
        assert path in names, path
    assert not any(n.startswith(("tests/", "attnjax/tests/", "colabs/")) for n in names)


def test_the_wheel_names_version_licence_repository_and_command(wheel):
    dist_info = f"attnjax-{attnjax.__version__}.dist-info"
    meta = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert f"Version: {attnjax.__version__}\n" in meta  # single-sourced from attnjax.__version__
    assert "License-Expression: Apache-2.0" in meta
    assert "Project-URL: Repository, https://github.com/attnjax/attnjax" in meta
    scripts = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "attnjax-train = attnjax._layout:train" in scripts


def test_import_attnjax_reaches_its_subpackages():
    import attnjax as a

    for name in ("ops", "masks", "nn", "parallel", "core", "score_mods", "normalizers"):
        assert hasattr(a, name), name
    assert hasattr(a, "analysis") or not (ROOT / "attnjax" / "analysis").exists()


@pytest.mark.slow
def test_the_wheel_runs_the_demo_in_a_fresh_venv(wheel, tmp_path):
    """Installs the wheel alone (``--no-deps --no-index``) into a new venv that borrows this
    environment's dependencies through a ``.pth`` path (not its editable attnjax, whose finder a
    plain path does not load), then, outside the repository, runs a Pallas op and ``attnjax-train
    --config tiny_charlm``."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_borrowed_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in Path(site).iterdir() if not p.name.endswith(".pth")) == [
        "attnjax", f"attnjax-{attnjax.__version__}.dist-info"]
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = ("import importlib.util, jax.numpy as jnp, attnjax\nfrom attnjax import masks, ops\n"
             "x = jnp.ones((1, 32, 2, 16))\n"
             "assert ops.attention(x, x, x, mask=masks.causal(), implementation='pallas').shape == x.shape\n"
             "assert importlib.util.find_spec('experiments') is None\n"
             "assert importlib.util.find_spec('kernels_pallas') is None\nprint(attnjax.__file__)\n")
    out = subprocess.run([str(python), "-c", probe], cwd=work, check=True, capture_output=True, text=True,
                         timeout=300).stdout
    assert out.strip().startswith(site), out
    run = subprocess.run([str(venv / "bin" / "attnjax-train"), "--config", "tiny_charlm", "--override",
                          "steps=2", "layers=1", "width=32", "heads=2", "seq_len=32", "batch_size=4",
                          "eval_batches=1", "log_every=1", "checkpoint_every=0", f"out_dir={work / 'run'}"],
                         check=False, cwd=work, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "validation loss" in run.stdout and (work / "run" / "summary.json").exists()
