"""Every Pallas kernel compiles to an sm_90 (H100/H200) binary within the 227 KiB of shared memory
a block may use: the Triton IR that Pallas builds (tests/kernels/test_gpu_lowering.py lowers it)
is compiled by the pip ``triton`` package, and the binary's shared memory, registers and stack
(register spills) are written to ``benchmarks/results/gpu-compile-sm90.json``.

Marker ``compile``; needs the ``accel-check`` extra (skipped with a reason without it):

    pip install -e ".[accel-check]" && python -m pytest -m compile
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks, ops, score_mods
from kernels_pallas.compile_check import SHARED_MEMORY_LIMIT, capture_triton, compile_sm90

pytestmark = [pytest.mark.compile, pytest.mark.slow]
triton = pytest.importorskip("triton", reason="the sm_90 compile check needs the accel-check extra (pip triton)")

RESULT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu-compile-sm90.json"
T, H = 512, 4
SEG = jnp.repeat(jnp.arange(4, dtype=jnp.int32), T // 4)[None]


def _attention(D, dtype=jnp.bfloat16, **kw):
    x = jnp.zeros((1, T, H, D), dtype)
    return (lambda q, k, v: ops.attention(q, k, v, implementation="pallas", **kw)), (x, x, x)


def _lightning(D):
    x = jnp.zeros((1, T, H, D), jnp.bfloat16)
    return (lambda q, k, v: ops.lightning_attention(q, k, v, log_decay=-0.1, implementation="pallas")), (x, x, x)


def _neighborhood(D):
    x = jnp.zeros((1, 32, 32, H, D), jnp.bfloat16)
    return (lambda q, k, v: ops.neighborhood_attention(q, k, v, kernel_size=7, implementation="pallas")), (x, x, x)


CASES = {
    **{f"flash-softmax-causal-bf16-D{D}": lambda D=D: _attention(D, mask=masks.causal()) for D in (64, 128, 256)},
    "flash-sigmoid-window-bf16-D128": lambda: _attention(128, mask=masks.sliding_window(128), normalizer="sigmoid"),
    "flash-document-alibi-dropout-bf16-D128": lambda: _attention(
        128, mask=masks.document(SEG) & masks.causal(), score_mod=score_mods.alibi(score_mods.alibi_slopes(H)),
        dropout_rate=0.1, dropout_key=jax.random.key(0)),
    "flash-softmax-causal-f32-D64": lambda: _attention(64, jnp.float32, mask=masks.causal()),
    **{f"lightning-bf16-D{D}": lambda D=D: _lightning(D) for D in (64, 128)},
    "neighborhood-2d-k7-bf16-D96": lambda: _neighborhood(96),
}


def _kernels(case):
    op, args = CASES[case]()
    loss = lambda *a: op(*a).astype(jnp.float32).sum()
    return capture_triton(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args)


def test_every_kernel_compiles_for_sm90_within_shared_memory():
    from experiments.bench.common import environment

    rows = []
    for case in CASES:
        for kernel in _kernels(case):
            rows.append(dict(case=case, **compile_sm90(kernel)))
    over = [r for r in rows if r["shared"] > SHARED_MEMORY_LIMIT]
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(dict(
        suite="gpu-compile-sm90", command="python -m pytest -m compile tests/kernels/test_gpu_binaries.py",
        target="sm_90 (H100/H200), triton " + triton.__version__, shared_memory_limit=SHARED_MEMORY_LIMIT,
        environment=environment(), kernels=rows), indent=2) + "\n")
    assert len(rows) == 3 * 6 + 2 * 2 + 3, [r["name"] for r in rows]
    assert not over, f"kernels over {SHARED_MEMORY_LIMIT} bytes of shared memory: {over}"
