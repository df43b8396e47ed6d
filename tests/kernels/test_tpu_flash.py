"""The TPU flash kernels (``kernels_pallas/flash/tpu.py``) against the dense reference, values and
gradients, in TPU interpret mode (``pltpu.InterpretParams``: TPU memory semantics on CPU).

``attnjax.core.platform.target("tpu", interpret=True)`` makes ``implementation="pallas"`` route to the TPU
kernels; only ``"pallas"`` is allowed, so a kernel that declined would fail the test rather than
fall back. Interpret mode is ~30x slower than the GPU template's, so shapes are small and most
cases are ``slow``. Lowering and compiling for TPU v5e: ``test_tpu_lowering.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks, ops, score_mods
from attnjax.core import platform
from tests import harness
from tests.suites import check_poison_causal, check_poison_padding

B, T, S, H, K = 1, 256, 384, 4, 2
TILES = ops.BlockSizes(128, 128)  # small inputs cross several tiles (2 x 3)
SEG_Q = jnp.asarray(harness.segments(0, B, T))
SEG_KV = jnp.asarray(harness.segments(0, B, S))

KINDS = {
    "full": dict(),
    "causal": dict(mask=masks.causal()),
    "window": dict(mask=masks.sliding_window(100, 20)),
    "document": dict(mask=masks.document(SEG_Q, SEG_KV) & masks.causal()),
    "alibi": dict(mask=masks.causal(), score_mod=score_mods.alibi(score_mods.alibi_slopes(H))),
    "sigmoid": dict(mask=masks.causal(), normalizer="sigmoid"),
    "dropout": dict(mask=masks.causal(), dropout_rate=0.2, dropout_key=jax.random.key(3)),
    "sigmoid_dropout": dict(mask=masks.sliding_window(100, 20), normalizer="sigmoid", dropout_rate=0.2,
                            dropout_key=jax.random.key(4)),
    "sigmoid_alibi_softcap": dict(
        normalizer="sigmoid",
        score_mod=score_mods.compose(score_mods.alibi(score_mods.alibi_slopes(H)), score_mods.softcap(20.0))),
}
FAST = {("document", "bf16", 128)}  # the fast tier: one TPU interpret case (segment ids by tile, bf16)
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _check(kind, dtype, D, t=T, s=S, return_lse=False, block_sizes=TILES):
    kw = KINDS[kind]
    shape = harness.Shape(B=B, T=t, S=s, H=H, K=K, D=D, E=D)
    args = shape.qkv(jax.random.key(1))
    op = lambda impl: lambda q, k, v: ops.attention(q, k, v, implementation=impl, return_lse=return_lse,
                                                    block_sizes=block_sizes, **kw)
    with platform.target("tpu", interpret=True):
        harness.check_vjp(op("pallas"), op("reference"), args, DTYPES[dtype], what=f"tpu {kind}")


@pytest.mark.parametrize("kind, dtype, D", [
    pytest.param(kind, dtype, D, id=f"{kind}-{dtype}-{D}", marks=() if (kind, dtype, D) in FAST else pytest.mark.slow)
    for kind in KINDS for dtype in DTYPES for D in (64, 128)])
def test_tpu_flash_matches_reference(kind, dtype, D):
    _check(kind, dtype, D)


@pytest.mark.slow
def test_tpu_flash_lse_on_ragged_lengths():
    """Lengths that are not tile multiples (padded inside), and the log-sum-exp output."""
    _check("causal", "f32", 64, t=200, s=300, return_lse=True)


@pytest.mark.slow
def test_tpu_flash_rows_without_keys_give_zeros():
    """Bottom-right causal with T > S: the first T - S queries see no key (zeros, finite grads)."""
    _check("causal", "f32", 64, t=384, s=256)


@pytest.mark.slow
def test_tpu_flash_default_tiles():
    """``block_sizes=None``: the TPU defaults (512) clipped to the lengths."""
    _check("document", "bf16", 128, block_sizes=None)


def test_tpu_flash_declines_what_it_cannot_serve():
    q = k = v = jnp.zeros((1, 128, 2, 64))
    with platform.target("tpu", interpret=True):
        for kw in (dict(bias=jnp.zeros((1, 1, 128, 128))),
                   dict(score_mod=score_mods.relative_bias(jnp.ones((2, 9)))),
                   dict(block_sizes=ops.BlockSizes(64, 64))):
            with pytest.raises(NotImplementedError):
                ops.attention(q, k, v, implementation="pallas", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_tpu_flash_confines_poison(normalizer):
    """Non-finite keys, values and queries reach only the entries the mask allows (the generic
    suite's checks: a poisoned causal position, NaN padding)."""
    op = lambda q, k, v, **kw: ops.attention(q, k, v, implementation="pallas", **kw)
    with platform.target("tpu", interpret=True):
        check_poison_causal(op, normalizer)
        check_poison_padding(lambda q, k, v, **kw: op(q, k, v, normalizer=normalizer, **kw))
