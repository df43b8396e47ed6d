"""Score-function variants (issue 22): separate key/value head counts in ``ops.attention`` (C8),
pairwise score functions and content-dependent relative logits inside the blockwise path (C3),
and the ops built on them. Each efficient path against its dense reference (values and
gradients, f32 and bf16, odd sizes), plus the known answers the papers give."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, ops, score_mods
from tests import harness

DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
SMALL = {"block_sizes": ops.BlockSizes(block_q=8, block_k=8)}


def _x(key, *shape, scale=1.0):
    return harness.normal(jax.random.key(key), shape, scale=scale)


# -- C8: separate key-head and value-head counts ------------------------------------------------


def _split_heads_dense(q, k, v, causal):
    """``softmax(q_h . k_{h // (H/Kk)}) v_{h // (H/Kv)}`` written out head by head."""
    H, Kk, Kv = q.shape[2], k.shape[2], v.shape[2]
    kr, vr = jnp.repeat(k, H // Kk, axis=2), jnp.repeat(v, H // Kv, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, kr, precision="highest") / np.sqrt(q.shape[-1])
    if causal:
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    return jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(s, -1), vr, precision="highest")


@pytest.mark.parametrize(
    "heads,impl,dtype",
    [
        ((6, 2, 3), "xla", jnp.float32),
        ((4, 1, 4), "xla", jnp.bfloat16),
        ((4, 4, 2), "reference", jnp.float32),
    ],
    ids=["H6Kk2Kv3-xla-f32", "H4Kk1Kv4-xla-bf16", "H4Kk4Kv2-reference-f32"],
)
def test_separate_key_and_value_heads(heads, impl, dtype):
    H, Kk, Kv = heads
    args = (_x(0, 2, 11, H, 8), _x(1, 2, 11, Kk, 8), _x(2, 2, 11, Kv, 5))
    fn = lambda q, k, v: ops.attention(q, k, v, mask=masks.causal(), implementation=impl, **SMALL)
    harness.check_vjp(fn, lambda q, k, v: _split_heads_dense(q, k, v, True), args, dtype, what=f"C8 {impl}")


def test_separate_key_and_value_heads_in_the_kernel():
    """The Pallas path (interpret mode on CPU) serves separate head counts too."""
    args = (_x(0, 1, 16, 4, 8), _x(1, 1, 16, 1, 8), _x(2, 1, 16, 2, 8))
    got = ops.attention(*args, mask=masks.causal(), implementation="pallas")
    harness.assert_close(got, _split_heads_dense(*args, True), 2e-5, "C8 pallas")


def test_separate_head_counts_validation():
    q, k = _x(0, 1, 5, 6, 4), _x(1, 1, 5, 2, 4)
    with pytest.raises(ValueError, match="value has 4 heads"):
        ops.attention(q, k, _x(2, 1, 5, 4, 4))
    with pytest.raises(ValueError, match=r"agree in \[batch, kv_len\]"):
        ops.attention(q, k, _x(2, 1, 6, 3, 4))


# -- C3: pairwise score functions and relative logits -------------------------------------------

_dot = lambda p, a, b: p * (a * b).sum(-1)


@DTYPES
def test_pairwise_dot_product_is_attention(dtype):
    """A pairwise function that is the scaled dot product reproduces plain attention (replace=True,
    scores from the features alone), blockwise with GQA and a causal mask."""
    q, k, v = _x(0, 2, 13, 4, 6), _x(1, 2, 13, 2, 6), _x(2, 2, 13, 2, 5)

    def fn(q, k, v):
        mod = score_mods.pairwise(_dot, q, k, jnp.float32(6**-0.5), replace=True)
        zq, zk = jnp.zeros(q.shape[:3] + (1,), q.dtype), jnp.zeros(k.shape[:3] + (1,), q.dtype)
        return ops.attention(zq, zk, v, score_mod=mod, mask=masks.causal(), implementation="xla", **SMALL)

    ref = lambda q, k, v: ops.attention(q, k, v, mask=masks.causal(), implementation="reference")
    harness.check_vjp(fn, ref, (q, k, v), dtype, what="pairwise dot")


@pytest.mark.parametrize(
    "outside,dtype",
    [("clip", jnp.float32), ("zero", jnp.float32), ("clip", jnp.bfloat16)],
    ids=["clip-f32", "zero-f32", "clip-bf16"],
)
def test_relative_logits_blockwise_equals_dense(outside, dtype):
    """Per-query tables read by offset (clipped and zeroed outside the radius) == the dense bias
    they describe; gradients reach the table."""
    B, T, S, H, R = 2, 9, 13, 2, 3
    q, k, v = _x(0, B, T, H, 4), _x(1, B, S, H, 4), _x(2, B, S, H, 4)
    table = _x(3, B, T, H, 2 * R + 1)
    fn = lambda q, k, v, t: ops.attention(
        q, k, v, score_mod=score_mods.relative_logits(t, outside=outside), implementation="xla", **SMALL
    )

    def ref(q, k, v, t):
        delta = jnp.arange(S)[None] - (jnp.arange(T)[:, None] + S - T)  # [T, S]
        slot = jnp.clip(delta, -R, R) + R
        bias = jnp.take_along_axis(t.transpose(0, 2, 1, 3), jnp.broadcast_to(slot, (B, H, T, S)), -1)
        if outside == "zero":
            bias = jnp.where(jnp.abs(delta) <= R, bias, 0.0)
        return ops.attention(q, k, v, bias=bias, implementation="reference")

    harness.check_vjp(fn, ref, (q, k, v, table), dtype, what=f"relative_logits {outside}")


def test_c3_validation():
    with pytest.raises(ValueError, match="q_feats"):
        ops.attention(
            *(_x(i, 1, 4, 2, 3) for i in range(3)),
            score_mod=score_mods.pairwise(_dot, _x(0, 1, 4, 3, 3), _x(1, 1, 4, 3, 3), 1.0),
        )
    with pytest.raises(ValueError, match="2R \\+ 1"):
        ops.attention(
            *(_x(i, 1, 4, 2, 3) for i in range(3)), score_mod=score_mods.relative_logits(_x(0, 1, 4, 2, 4))
        )


# -- 3.5 neural attention --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask,dtype", [(None, jnp.float32), (masks.causal(), jnp.bfloat16)], ids=["full-f32", "causal-bf16"]
)
def test_neural_attention_blockwise_equals_dense(mask, dtype):
    """MLP scores per tile == the dense [T, S, M] MLP of concatenated pairs; gradients of q', k',
    v and every MLP parameter."""
    q, k, v = _x(0, 2, 11, 4, 3), _x(1, 2, 11, 2, 3), _x(2, 2, 11, 2, 5)
    mlp = ops.neural_attention_mlp(jax.random.key(4), 3, hidden=6)
    mlp = {n: p + 0.1 for n, p in mlp.items()}  # nonzero biases
    fn = lambda impl: (
        lambda q, k, v, m: ops.neural_attention(
            q, k, v, m, mask=mask, implementation=impl, **(SMALL if impl == "xla" else {})
        )
    )
    # b3 shifts every score of a row alike: its gradient is zero up to rounding (checked below)
    # (bf16: the MLP's gradients sum over all T x S pairs of rounded inputs, hence tol_scale)
    harness.check_vjp(
        fn("xla"),
        fn("reference"),
        (q, k, v, mlp),
        dtype,
        what="neural",
        tol_scale=2.0,
        loose={"grad[3]['b3']": np.inf},
    )
    g = jax.grad(lambda m: fn("xla")(q, k, v, m).sum())(mlp)["b3"]
    assert abs(float(g)) < 1e-4


def test_neural_attention_linear_mlp_is_attention_with_a_learned_query():
    """An MLP whose ReLUs pass a linear function through (``relu(x) - relu(-x) = x``) and ignore
    the query computes ``e_ij = u . k'_j``: attention with the one query ``u``."""
    P = 3
    q, k, v = _x(0, 1, 7, 2, P), _x(1, 1, 7, 2, P), _x(2, 1, 7, 2, 4)
    u = jnp.array([0.5, -1.0, 2.0])
    w1 = jnp.zeros((2 * P, 2)).at[P:, 0].set(u).at[P:, 1].set(-u)
    mlp = {
        "w1": w1,
        "b1": jnp.zeros(2),
        "w2": jnp.eye(2),
        "b2": jnp.zeros(2),
        "w3": jnp.array([1.0, -1.0]),
        "b3": jnp.float32(3.0),
    }
    out = ops.neural_attention(q, k, v, mlp, **SMALL)
    want = ops.attention(jnp.broadcast_to(u, q.shape), k, v, scale=1.0, implementation="reference")
    harness.assert_close(out, want, 1e-5, "linear MLP")


def test_neural_attention_validation():
    q = _x(0, 1, 4, 2, 3)
    mlp = ops.neural_attention_mlp(jax.random.key(0), 4)
    with pytest.raises(ValueError, match="w1 \\[2P=6, M\\]"):
        ops.neural_attention(q, q, q, mlp)
    with pytest.raises(ValueError, match="keys"):
        ops.neural_attention(q, q, q, {"w1": 1})
