"""The TPU flash kernels lower for TPU v5e (an abstract device; no TPU needed), one
``tpu_custom_call`` per kernel; what they cannot serve declines at trace time, so
``implementation=None`` falls back to xla inside ``jax.jit``; and (marker ``compile``, needs pip
``libtpu``, the ``accel-check`` extra) the real Mosaic + XLA:TPU compilers accept them for a
compile-only v5e at 1K-128K tokens, one subprocess per case, the results recorded in
``benchmarks/results/tpu-compile-v5e.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks, ops, score_mods
from kernels_pallas.compile_check_tpu import libtpu_available, lower_for_tpu, tpu_calls

B, T, H, K = 1, 512, 4, 2
SEG = jnp.repeat(jnp.arange(4, dtype=jnp.int32), T // 4)[None]
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "tpu-compile-v5e.json"

KINDS = {
    "causal": dict(mask=masks.causal()),
    "window": dict(mask=masks.sliding_window(128, 16)),
    "document": dict(mask=masks.document(SEG) & masks.causal()),
    "alibi": dict(mask=masks.causal(), score_mod=score_mods.alibi(score_mods.alibi_slopes(H))),
    "softcap": dict(score_mod=score_mods.softcap(30.0)),
    "dropout": dict(mask=masks.causal(), dropout_rate=0.1, dropout_key=jax.random.key(0)),
}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
FAST = {("softmax", "document", "bf16"), ("sigmoid", "alibi", "bf16"), ("softmax", "causal", "f32")}


def _qkv(D, dtype, length=T):
    return (jnp.zeros((B, length, H, D), dtype), jnp.zeros((B, length, K, D), dtype),
            jnp.zeros((B, length, K, D), dtype))


def _lowered_value_and_grad(op, args):
    loss = lambda *a: op(*a).astype(jnp.float32).sum()
    return tpu_calls(lower_for_tpu(jax.value_and_grad(loss, argnums=tuple(range(len(args)))), *args))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_tpu_flash_lowers(normalizer, kind, dtype, request):
    if (normalizer, kind, dtype) not in FAST and "slow" not in request.keywords:
        request.applymarker(pytest.mark.slow)
    op = lambda q, k, v: ops.attention(q, k, v, normalizer=normalizer, implementation="pallas", **KINDS[kind])
    assert _lowered_value_and_grad(op, _qkv(64, DTYPES[dtype])) == 3  # forward, dq, dk+dv


# -- what the TPU kernels cannot serve falls back to xla inside jit -------------------------------


DECLINED = {
    "relative_bias": lambda q, k, v: ops.attention(q, k, v, score_mod=score_mods.relative_bias(jnp.ones((H, 33)))),
    "dense_bias": lambda q, k, v: ops.attention(q, k, v, bias=jnp.zeros((1, 1, T, T))),
    "tile_64": lambda q, k, v: ops.attention(q, k, v, block_sizes=ops.BlockSizes(64, 64)),
}


@pytest.mark.parametrize("case", list(DECLINED))
def test_tpu_unsupported_configurations_fall_back_to_xla_under_jit(case):
    assert _lowered_value_and_grad(DECLINED[case], _qkv(64, jnp.bfloat16)) == 0


def test_tpu_learned_score_mod_parameters_fall_back_under_jit():
    q, k, v = _qkv(64, jnp.bfloat16)
    loss = lambda q, k, v, s: ops.attention(q, k, v, mask=masks.causal(),
                                            score_mod=score_mods.alibi(s)).astype(jnp.float32).sum()
    assert tpu_calls(lower_for_tpu(jax.grad(loss, argnums=(0, 3)), q, k, v, score_mods.alibi_slopes(H))) == 0


def test_tpu_is_chosen_by_default_on_tpu():
    """``implementation=None`` on TPU takes the Pallas kernels (dispatch honours the target)."""
    op = lambda q, k, v: ops.attention(q, k, v, mask=masks.causal())
    assert _lowered_value_and_grad(op, _qkv(128, jnp.bfloat16)) == 3


# -- a real compile for a compile-only v5e ---------------------------------------------------------

COMPILE_CASES = [(T, D, "causal") for T in (1024, 16384, 131072) for D in (64, 128)] + [
    (16384, 128, "document"), (16384, 128, "sigmoid"), (16384, 128, "dropout"), (131072, 128, "window")]


def _compile_in_subprocess(T, D, kind) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.bench.tpu_compile", f"--T={T}", f"--D={D}", f"--kind={kind}"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode or not lines:  # libtpu aborts the process on kernels it rejects
        tail = "\n".join((run.stderr or "").splitlines()[-15:])
        return dict(kernel="flash", T=T, D=D, kind=kind, dtype="bfloat16", compiled=False,
                    returncode=run.returncode, error=tail)
    return json.loads(lines[-1])


def _record(result: dict) -> None:
    table = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"cases": []}
    key = lambda r: (r["kernel"], r["T"], r["D"], r["kind"], r["dtype"])
    table["cases"] = sorted([r for r in table["cases"] if key(r) != key(result)] + [result], key=key)
    table["device"] = "TPU v5e (compile-only topology v5e=1x1, libtpu; no chip)"
    table["jax"] = jax.__version__
    table["what"] = ("value and gradients of flash attention, B=1 H=4 K=2, bf16, default TPU tiles; "
                     "sizes in bytes from the compiled executable's memory analysis")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(table, indent=1) + "\n")


@pytest.mark.compile
@pytest.mark.skipif(not libtpu_available(), reason="needs pip libtpu (the accel-check extra)")
@pytest.mark.parametrize("T, D, kind", COMPILE_CASES, ids=[f"{k}-T{t}-D{d}" for t, d, k in COMPILE_CASES])
def test_tpu_flash_compiles_for_v5e(T, D, kind):
    result = _compile_in_subprocess(T, D, kind)
    _record(result)
    assert result["compiled"], result.get("error")
    assert result["kernels"] == 3
