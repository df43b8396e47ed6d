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


@pytest.mark.parametrize("normalizer, kind, dtype", [
    pytest.param(n, kind, dtype, id=f"{n}-{kind}-{dtype}", marks=() if (n, kind, dtype) in FAST else pytest.mark.slow)
    for n in ("softmax", "sigmoid") for kind in KINDS for dtype in DTYPES])
def test_tpu_flash_lowers(normalizer, kind, dtype):
    op = lambda q, k, v: ops.attention(q, k, v, normalizer=normalizer, implementation="pallas", **KINDS[kind])
    assert _lowered_value_and_grad(op, _qkv(64, DTYPES[dtype])) == 3  # forward, dq, dk+dv


NEIGHBORHOOD_CASES = [((300,), 33, 64), ((20, 12), (5, 3), 128), ((9, 6, 5), 3, 96)]


@pytest.mark.parametrize("spatial, kernel_size, D", NEIGHBORHOOD_CASES,
                         ids=[f"{len(s)}d-D{d}" for s, _, d in NEIGHBORHOOD_CASES])
def test_tpu_neighborhood_lowers(spatial, kernel_size, D):
    """Neighborhood attention on the TPU flash kernels (TPU spatial tiles of 128 tokens)."""
    x = jnp.zeros((1, *spatial, 2, D), jnp.bfloat16)
    op = lambda q, k, v: ops.neighborhood_attention(q, k, v, kernel_size=kernel_size, implementation="pallas")
    assert _lowered_value_and_grad(op, (x, x, x)) == 3


def test_tpu_neighborhood_odd_spatial_tile_falls_back_under_jit():
    x = jnp.zeros((1, 16, 16, 2, 64), jnp.bfloat16)
    op = lambda q, k, v: ops.neighborhood_attention(q, k, v, kernel_size=3,
                                                    block_sizes=ops.BlockSizes(spatial=(4, 4)))
    assert _lowered_value_and_grad(op, (x, x, x)) == 0


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("segments", [False, True], ids=["plain", "documents"])
def test_tpu_lightning_lowers(segments, D):
    """Lightning's forward, dq and dk/dv kernels, each lowered (the whole jit too: the forward
    call is kept by the final state in the loss)."""
    x = jnp.zeros((B, 300, 2, D), jnp.bfloat16)
    seg = jnp.repeat(jnp.arange(3, dtype=jnp.int32), 100)[None] if segments else None

    def op(q, k, v, a):
        out, final = ops.lightning_attention(q, k, v, log_decay=a, segment_ids=seg, return_final_state=True,
                                             implementation="pallas")
        return out.astype(jnp.float32).sum() + final.sum()

    lowered = lower_for_tpu(jax.value_and_grad(op, argnums=(0, 1, 2, 3)), x, x, x, jnp.full((2,), -0.1))
    assert tpu_calls(lowered) == 3


def test_tpu_ring_blocks_decline_pallas_and_fall_back():
    """The TPU flash kernel does not take a Shard yet: a ring restricted to ``"pallas"`` declines
    at trace time, and ``implementation=None`` runs its blocks on xla (no Mosaic kernel)."""
    from attnjax import parallel
    from attnjax.core import platform

    mesh = jax.make_mesh((2,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.PartitionSpec(None, "context")
    ring = lambda impl: jax.shard_map(
        lambda q, k, v: parallel.ring_attention(q, k, v, axis_name="context", mask=masks.causal(),
                                                implementation=impl),
        mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
    q, k, v = _qkv(64, jnp.bfloat16)
    with platform.target("tpu"):
        with pytest.raises(NotImplementedError, match="Shard"):
            jax.jit(ring("pallas")).trace(q, k, v)
        assert tpu_calls(jax.jit(ring(None)).trace(q, k, v).lower().as_text()) == 0


def test_tpu_lightning_odd_chunks_fall_back_under_jit():
    x = jnp.zeros((B, 256, 2, 64), jnp.bfloat16)
    op = lambda q, k, v: ops.lightning_attention(q, k, v, log_decay=-0.1, block_size=64)
    assert _lowered_value_and_grad(op, (x, x, x)) == 0


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

COMPILE_CASES = [("flash", T, D, "causal") for T in (1024, 16384, 131072) for D in (64, 128)] + [
    ("flash", 16384, 128, "document"), ("flash", 16384, 128, "sigmoid"), ("flash", 16384, 128, "dropout"),
    ("flash", 131072, 128, "window"),
    # neighborhood: T tokens as 1-D (window 129), 2-D sqrt(T)^2 (13x13), 3-D 16 x sqrt(T/16)^2 (5x7x7)
    ("neighborhood", 16384, 128, "1d"), ("neighborhood", 16384, 128, "2d"), ("neighborhood", 16384, 64, "3d"),
    # 64K tokens in 2-D: the dk/dv visit table stays as narrow as the longest column (the block
    # map is concrete at trace time), so it fits the 1 MiB SMEM.
    ("neighborhood", 65536, 128, "2d"),
    # lightning: B=1 H=4 D=E, decay, initial and final state; documents: traced segment ids
    *[("lightning", T, D, "decay") for T in (1024, 16384, 131072) for D in (64, 128)],
    ("lightning", 16384, 128, "documents"),
    # context parallelism: ring attention in shard_map over a v5e 2x2 topology (causal: 4 chips,
    # contiguous; zigzag: 2 chips). The TPU flash kernel declines a Shard, so the ring's blocks
    # run the xla path: 0 Mosaic kernels, and the compile proves that fallback is clean.
    ("ring", 16384, 128, "causal"), ("ring", 16384, 128, "zigzag"),
]
KERNELS = {"flash": 3, "neighborhood": 3, "lightning": 3, "ring": 0}


def _compile_in_subprocess(kernel, T, D, kind) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "experiments.bench.tpu_compile", f"--kernel={kernel}", f"--T={T}", f"--D={D}",
           f"--kind={kind}"] + (["--devices=2"] if (kernel, kind) == ("ring", "zigzag") else [])
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode or not lines:  # libtpu aborts the process on kernels it rejects
        tail = "\n".join((run.stderr or "").splitlines()[-15:])
        return dict(kernel=kernel, T=T, D=D, kind=kind, dtype="bfloat16", compiled=False,
                    returncode=run.returncode, error=tail)
    return json.loads(lines[-1])


def _record(result: dict) -> None:
    table = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"cases": []}
    key = lambda r: (r["kernel"], r["T"], r["D"], r["kind"], r["dtype"])
    table["cases"] = sorted([r for r in table["cases"] if key(r) != key(result)] + [result], key=key)
    table["device"] = "TPU v5e (compile-only topology v5e=1x1, libtpu; no chip)"
    table["jax"] = jax.__version__
    table["what"] = ("value and gradients, bf16, default TPU tiles: flash attention B=1 H=4 K=2; ring: flash "
                     "attention B=1 H=4 K=2 causal over T global tokens in shard_map on a v5e 2x2 topology; neighborhood "
                     "attention B=1 H=4 K=2 on T tokens (kind: 1d window 129, 2d sqrt(T)^2 13x13, 3d "
                     "16 x sqrt(T/16)^2 5x7x7); lightning B=1 H=4 D=E with decay, initial and final state; "
                     "sizes in bytes from the compiled executable's memory analysis")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(table, indent=1) + "\n")


@pytest.mark.compile
@pytest.mark.skipif(not libtpu_available(), reason="needs pip libtpu (the accel-check extra)")
@pytest.mark.parametrize("kernel, T, D, kind", COMPILE_CASES,
                         ids=[f"{c[0]}-{c[3]}-T{c[1]}-D{c[2]}" for c in (getattr(c, "values", c) for c in COMPILE_CASES)])
def test_tpu_kernels_compile_for_v5e(kernel, T, D, kind):
    result = _compile_in_subprocess(kernel, T, D, kind)
    _record(result)
    assert result["compiled"], result.get("error")
    assert result["kernels"] == KERNELS[kernel]
