"""The project's promises about itself: README commands, runnable docs, demo and benchmarks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    """CI runs the README's test command, then the accelerator compile checks the README documents."""
    blocks = _readme_blocks("bash")
    setup = blocks[0].strip().splitlines()
    assert len(setup) == 2, "README opens with exactly two set-up commands"
    *_, test_command, compile_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert test_command == setup[1]
    assert any(block.strip() == compile_command for block in blocks[1:]), "README documents CI's compile step"
    assert compile_command.endswith("python -m pytest -m compile")
    assert setup[0].endswith("python -m experiments.train --config tiny_charlm")


def test_readme_demo_is_the_tiny_charlm_config():
    """The demo's config exists, says the same command, and stays small enough for a CPU (its
    few-step training run is tests/test_experiments.py::test_each_task_trains)."""
    from experiments import config

    path = ROOT / "experiments" / "configs" / "tiny_charlm.py"
    cfg = config.load(path)
    assert "python -m experiments.train --config tiny_charlm" in path.read_text()
    assert cfg.task == "charlm" and cfg.layers * cfg.width * cfg.steps <= 2 * 64 * 300


def test_readme_python_blocks_run():
    namespace: dict = {}
    for block in _readme_blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own docs


@pytest.mark.slow
def test_cpu_benchmark_smoke(tmp_path):
    out = tmp_path / "attention.json"
    subprocess.run([sys.executable, "-m", "experiments.bench.cpu", "attention", "--quick", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["implementation"] for r in rows} == {"reference", "xla", "jax.nn"}
    assert all("seconds" in r and r["seconds"] > 0 for r in rows), rows
    # provenance a reader can check, and the log-log plot beside the JSON
    assert result["command"].startswith("python -m experiments.bench.cpu attention")
    assert len(result["git"]["commit"]) == 40 and len(result["load_average"]["start"]) == 3
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_cpu_peers_benchmark_smoke(tmp_path):
    """``python -m experiments.bench.cpu peers --quick``: attnjax and whichever peers import here,
    interleaved, each row with GFLOP/s and its fraction of the measured matmul peak."""
    out = tmp_path / "peers.json"
    subprocess.run([sys.executable, "-m", "experiments.bench.cpu", "peers", "--quick", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=900)
    result = json.loads(out.read_text())
    rows = [r for r in result["rows"] if r["implementation"] == "attnjax"]
    assert {r["case"] for r in rows} == {"causal", "sliding_window", "document", "na1d", "na2d"}
    assert all(r["seconds"] > 0 and 0 < r["fraction_of_peak"] for r in rows), rows
    assert result["peak_gflops"]["peak"] > 0 and "jax.nn" in result["available"]
    assert out.with_name("peers-causal.png").stat().st_size > 0


@pytest.mark.slow
def test_gpu_benchmark_dry_run_on_cpu(tmp_path):
    """``python -m experiments.bench.gpu all --dry-run``: every GPU suite at tiny sizes, the
    kernels in interpret mode, each checked against the reference, into one JSON."""
    out = tmp_path / "all.json"
    subprocess.run([sys.executable, "-m", "experiments.bench.gpu", "all", "--dry-run", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=900)
    suites = json.loads(out.read_text())["suites"]
    assert set(suites) == {"flash", "lightning", "neighborhood"}
    rows = suites["flash"]["rows"]
    assert {r["implementation"] for r in rows} >= {"pallas_softmax", "pallas_sigmoid", "xla_softmax"}
    assert all("error" not in r for r in rows), rows
    assert all(r["max_error_vs_reference"] < 0.05 for r in rows), rows
    assert suites["lightning"]["rows"] and suites["neighborhood"]["rows"]
    assert all((tmp_path / f"all-{name}.png").exists() for name in ("flash", "lightning"))
