"""The Pallas kernels lower for CUDA (an abstract H100; no GPU needed), one Triton custom call per
kernel, for every configuration the GPU issue lists; what the kernels cannot compile declines at
trace time, so ``implementation=None`` falls back to xla inside ``jax.jit`` instead of failing.

Binary compilation of the same kernels to sm_90 (shared memory, registers, spills) is
``tests/kernels/test_gpu_binaries.py`` (marker ``compile``, needs the ``accel-check`` extra).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks, ops, score_mods
from kernels_pallas.compile_check import lower_for_gpu, triton_calls

B, T, H, K = 1, 256, 4, 2
SEG = jnp.repeat(jnp.arange(4, dtype=jnp.int32), T // 4)[None]

FLASH_KINDS = {
    "causal": dict(mask=masks.causal()),
    "window": dict(mask=masks.sliding_window(64, 16)),
    "document": dict(mask=masks.document(SEG) & masks.causal()),
    "alibi": dict(mask=masks.causal(), score_mod=score_mods.alibi(score_mods.alibi_slopes(H))),
    "softcap": dict(score_mod=score_mods.softcap(30.0)),
    "dropout": dict(mask=masks.causal(), dropout_rate=0.1, dropout_key=jax.random.key(0)),
}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def _qkv(D, dtype, kv_heads=K, length=T):
    return (jnp.zeros((B, length, H, D), dtype), jnp.zeros((B, length, kv_heads, D), dtype),
            jnp.zeros((B, length, kv_heads, D), dtype))


def _lowered_value_and_grad(op, args):
    """Lowers value and gradients (so no kernel is dead code) and returns the Triton call count."""
    loss = lambda *a: op(*a).astype(jnp.float32).sum()
    return triton_calls(lower_for_gpu(jax.value_and_grad(loss, argnums=tuple(range(len(args)))), *args))


def _flash(normalizer, kind, dtype, D=64, kv_heads=K):
    op = lambda q, k, v: ops.attention(q, k, v, normalizer=normalizer, implementation="pallas",
                                       **FLASH_KINDS[kind])
    return _lowered_value_and_grad(op, _qkv(D, dtype, kv_heads))


# The fast tier lowers three representative configurations; the README command lowers all 36.
FAST = {("softmax", "document", "bf16"), ("sigmoid", "dropout", "bf16"), ("softmax", "alibi", "f16")}
FLASH_CASES = [pytest.param(n, kind, dt, id=f"{n}-{kind}-{dt}",
                            marks=() if (n, kind, dt) in FAST else pytest.mark.slow)
               for n in ("softmax", "sigmoid") for kind in FLASH_KINDS for dt in DTYPES]


@pytest.mark.parametrize("normalizer, kind, dtype", FLASH_CASES)
def test_flash_lowers(normalizer, kind, dtype):
    assert _flash(normalizer, kind, DTYPES[dtype]) == 3  # forward, dq, dk+dv


@pytest.mark.slow
@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_flash_lowers_for_head_dims(normalizer, D):
    assert _flash(normalizer, "causal", jnp.bfloat16, D=D, kv_heads=1) == 3


@pytest.mark.parametrize("D", [64, 128])
def test_lightning_lowers(D):
    op = lambda q, k, v: ops.lightning_attention(q, k, v, log_decay=-0.1, implementation="pallas")
    assert _lowered_value_and_grad(op, _qkv(D, jnp.bfloat16, kv_heads=H)) == 2  # forward, backward


def test_lightning_declines_wide_heads_on_gpu():
    """D=256: the backward's two [D, E] float32 states do not fit on chip, so the kernels decline
    at trace time and the jitted gradient takes the xla path (no Triton kernel)."""
    op = lambda q, k, v: ops.lightning_attention(q, k, v, log_decay=-0.1)
    assert _lowered_value_and_grad(op, _qkv(256, jnp.bfloat16, kv_heads=H)) == 0


NEIGHBORHOOD_CASES = [pytest.param(spatial, kernel_size, D, id=f"{len(spatial)}d-D{D}",
                                   marks=() if (len(spatial), D) == (2, 96) else pytest.mark.slow)
                      for spatial, kernel_size in (((512,), 7), ((32, 32), (5, 7)), ((8, 16, 16), 3))
                      for D in (32, 96, 128)]


@pytest.mark.parametrize("spatial, kernel_size, D", NEIGHBORHOOD_CASES)
def test_neighborhood_lowers(spatial, kernel_size, D):
    x = jnp.zeros((1, *spatial, 2, D), jnp.bfloat16)
    op = lambda q, k, v: ops.neighborhood_attention(q, k, v, kernel_size=kernel_size, implementation="pallas")
    assert _lowered_value_and_grad(op, (x, x, x)) == 3


# -- what the kernels cannot serve falls back to xla inside jit -----------------------------------


def _learned_slopes(q, k, v, slopes):
    return ops.attention(q, k, v, mask=masks.causal(), score_mod=score_mods.alibi(slopes))


DECLINED = {
    # a table read at data-dependent offsets: a gather inside the kernel
    "relative_bias": lambda q, k, v: ops.attention(q, k, v, score_mod=score_mods.relative_bias(jnp.ones((H, 33)))),
    # a user's score mod that indexes an array by the key position
    "from_fn_gather": lambda q, k, v: ops.attention(
        q, k, v, score_mod=score_mods.from_fn(lambda p, s, b, h, qi, ki: s + p[ki], jnp.ones(T))),
    # a dense additive bias (the kernels take none)
    "dense_bias": lambda q, k, v: ops.attention(q, k, v, bias=jnp.zeros((1, 1, T, T))),
}


@pytest.mark.parametrize("case", list(DECLINED))
def test_unsupported_configurations_fall_back_to_xla_under_jit(case):
    """``implementation=None`` on a GPU tries Pallas first: these decline at trace time, so the
    jitted gradient lowers with no Triton kernel at all (the xla path), instead of failing."""
    assert _lowered_value_and_grad(DECLINED[case], _qkv(64, jnp.bfloat16)) == 0


def test_learned_score_mod_parameters_fall_back_under_jit():
    q, k, v = _qkv(64, jnp.bfloat16)
    loss = lambda q, k, v, s: _learned_slopes(q, k, v, s).astype(jnp.float32).sum()
    hlo = lower_for_gpu(jax.grad(loss, argnums=(0, 3)), q, k, v, score_mods.alibi_slopes(H))
    assert triton_calls(hlo) == 0


def test_declining_says_why():
    q, k, v = _qkv(64, jnp.bfloat16)
    op = lambda q, k, v: ops.attention(q, k, v, score_mod=score_mods.relative_bias(jnp.ones((H, 33))),
                                       implementation="pallas")
    with pytest.raises(NotImplementedError, match=r"cannot be compiled for gpu.*\['gather'\]"):
        lower_for_gpu(op, q, k, v)
