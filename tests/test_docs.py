"""The documentation site builds with warnings as errors (``mkdocs build --strict``: a docstring
griffe cannot parse, a broken cross-reference or a page missing from the nav fails), and its API
reference has a page for each public module, generated from the docstrings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("ops", "masks", "score_mods", "normalizers", "features", "dropout", "nn", "parallel", "core")


def test_the_site_builds_strictly_with_an_api_reference(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    for module in MODULES:
        page = (site / "api" / module / "index.html").read_text()
        assert f"attnjax.{module}" in page, module
    ops = (site / "api" / "ops" / "index.html").read_text()
    assert 'id="attnjax.ops.attention.api.attention"' in ops and "dot_product_attention" in ops
