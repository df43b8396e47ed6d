"""Zoo part 2 (issue 21): gathered attention from index sets (C2), partial attentions and their
reweighting (C5), coefficient-weighted softmax with coefficient gradients (C6), and the
long-context mechanisms built on them.

Each efficient path is checked against its dense reference with ``harness.check_vjp`` (values and
gradients; float32 and bfloat16; ragged lengths that are not multiples of the blocks; GQA), the
discrete selections computed identically on both sides (held fixed for gradients), plus each
mechanism's known-answer property from ZOO_SPECS.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, ops
from tests import harness
from tests.harness import Shape

GQA = Shape(B=2, T=37, S=45, H=4, K=2, D=12, E=10)  # ragged for every block size used below
DTYPES = pytest.mark.parametrize(
    "dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)], ids=["f32", "bf16"]
)


def _vjp(op, args, dtype=jnp.float32, **kw):
    harness.check_vjp(
        functools.partial(op, implementation="xla", **kw),
        functools.partial(op, implementation="reference", **kw),
        args,
        dtype,
        what=getattr(op, "__name__", "op"),
    )


# -- C2 gathered attention -----------------------------------------------------------------------


def _indices(key, B, Hs, nq, nk, n):
    """Random lists with padding slots (-1), out-of-range entries and repeats."""
    idx = jax.random.randint(key, (B, Hs, nq, n), -1, nk + 1)
    return idx.at[..., -1].set(idx[..., 0])  # a repeat in every list


@DTYPES
@pytest.mark.parametrize("heads", ["kv", "q"])
def test_gathered_matches_reference(dtype, heads):
    q, k, v = GQA.qkv(jax.random.key(0))
    Hs = GQA.K if heads == "kv" else GQA.H
    idx = _indices(jax.random.key(1), GQA.B, Hs, -(-GQA.T // 8), -(-GQA.S // 16), 3)
    bias = harness.normal(jax.random.key(2), (GQA.B, GQA.K, GQA.S))

    def op(q, k, v, bias, implementation):
        out, lse = ops.gathered_attention(
            q,
            k,
            v,
            idx,
            8,
            16,
            masks.causal(),
            key_bias=bias,
            return_lse=True,
            query_chunk=2,
            implementation=implementation,
        )
        return out, jnp.where(jnp.isneginf(lse), 0.0, lse)  # rows with no key: -inf on both sides

    _vjp(op, (q, k, v, bias), dtype)


def test_gathered_document_mask_per_query_head_bias():
    q, k, v = GQA.qkv(jax.random.key(3))
    idx = _indices(jax.random.key(4), GQA.B, GQA.K, 5, 3, 2)
    seg = jnp.asarray(harness.segments(0, GQA.B, GQA.S))
    mask = masks.document(seg[:, -GQA.T :], seg)
    bias = harness.normal(jax.random.key(5), (GQA.B, GQA.H, GQA.S))
    _vjp(
        lambda q, k, v, b, implementation: ops.gathered_attention(
            q, k, v, idx, 8, 16, mask, key_bias=b, implementation=implementation
        ),
        (q, k, v, bias),
    )


def test_gathered_all_blocks_is_attention():
    q, k, v = GQA.qkv(jax.random.key(6))
    nk = -(-GQA.S // 16)
    idx = jnp.broadcast_to(jnp.arange(nk)[::-1], (GQA.B, GQA.K, 5, nk))
    out = ops.gathered_attention(q, k, v, idx, 8, 16, masks.causal())
    ref = ops.attention(q, k, v, mask=masks.causal(), implementation="reference")
    harness.assert_close(out, ref, 2e-5, "all blocks")


def test_gathered_empty_rows_are_zero():
    q, k, v = GQA.qkv(jax.random.key(7))
    idx = jnp.full((GQA.B, GQA.K, 5, 2), -1)
    out, lse = ops.gathered_attention(q, k, v, idx, 8, 16, return_lse=True)
    assert not np.asarray(out).any() and np.isneginf(np.asarray(lse)).all()


def test_gathered_errors():
    q, k, v = GQA.qkv(jax.random.key(0))
    idx = jnp.zeros((GQA.B, GQA.K, 5, 2), jnp.int32)
    with pytest.raises(ValueError, match="q_blocks"):
        ops.gathered_attention(q, k, v, idx, 16, 16)
    with pytest.raises(ValueError, match="heads"):
        ops.gathered_attention(q, k, v, jnp.zeros((GQA.B, 3, 5, 2), jnp.int32), 8, 16)
    with pytest.raises(TypeError, match="integer"):
        ops.gathered_attention(q, k, v, idx.astype(jnp.float32), 8, 16)
    with pytest.raises(ValueError, match="key_bias"):
        ops.gathered_attention(q, k, v, idx, 8, 16, key_bias=jnp.zeros((GQA.B, 3, GQA.S)))


# -- C5 partial attentions, ACT / VAR redistribution ---------------------------------------------

SMALL = Shape(B=2, T=19, S=23, H=4, K=2, D=8, E=6)
FIRST = masks.from_fn(lambda b, h, i, j: j == 0)


def test_partials_merge_to_attention():
    q, k, v = SMALL.qkv(jax.random.key(8))
    parts = ops.partial_attentions(q, k, v, [FIRST, ~FIRST], mask=masks.causal())
    out, lse = ops.merge_partials(parts)
    ref, ref_lse = ops.attention(q, k, v, mask=masks.causal(), return_lse=True, implementation="reference")
    harness.assert_close(out, ref, 2e-5, "merge")
    w, lse2 = ops.part_weights(parts)
    np.testing.assert_allclose(np.asarray(w.sum(0)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse2), np.asarray(ref_lse), rtol=1e-5)


@DTYPES
@pytest.mark.parametrize("receivers", ["all", "some"])
def test_redistribute_matches_dense_edit(dtype, receivers):
    q, k, v = SMALL.qkv(jax.random.key(9))
    sinks = FIRST | masks.from_fn(lambda b, h, i, j: (j == 5) & (h % 2 == 0), heads=SMALL.H)
    recv = None if receivers == "all" else masks.from_fn(lambda b, h, i, j: j >= 7)
    beta = jnp.array([0.3, 1.0, 0.5, 0.0])  # per head; 1 = not calibrated
    op = lambda q, k, v, beta, implementation: ops.redistribute(
        q, k, v, sinks, beta, receivers=recv, mask=masks.causal(), implementation=implementation
    )
    _vjp(op, (q, k, v, beta), dtype)


def test_redistribute_identity_and_mass():
    """beta = 1 is plain attention; beta = 0 with ones as values keeps rows summing to 1 (here:
    outputs of all-ones values are 1) and puts no mass on the sinks."""
    q, k, v = SMALL.qkv(jax.random.key(10))
    ref = ops.attention(q, k, v, mask=masks.causal())
    harness.assert_close(ops.redistribute(q, k, v, FIRST, 1.0, mask=masks.causal()), ref, 2e-5, "beta=1")
    ones = jnp.ones_like(v)
    out = ops.redistribute(q, k, ones, FIRST, 0.0, mask=masks.causal())
    np.testing.assert_allclose(np.asarray(out)[:, SMALL.S - SMALL.T :], 1.0, rtol=1e-5)
    spike = v.at[:, 0].set(100.0)  # the sink's value: invisible once beta = 0 (rows with other keys)
    out0 = ops.redistribute(q, k, spike, FIRST, 0.0, mask=masks.causal())
    assert np.abs(np.asarray(out0)).max() < 10


# -- C6 coefficient-weighted softmax -------------------------------------------------------------


@DTYPES
def test_coefficient_attention_matches_reference(dtype):
    q, k, v = SMALL.qkv(jax.random.key(11))
    u = jax.random.uniform(jax.random.key(12), (SMALL.B, SMALL.H, SMALL.T, SMALL.S))
    coeff = jnp.where(u > 0.4, u, 0.0)

    def op(q, k, v, c, implementation):
        out, lse = ops.coefficient_attention(q, k, v, c, return_lse=True, implementation=implementation)
        return out, jnp.where(jnp.isneginf(lse), 0.0, lse)

    _vjp(op, (q, k, v, coeff), dtype)


def test_coefficient_straight_through_gradient():
    """A hard 0/1 mask with a straight-through estimator: the gradient to the soft mask equals the
    derivative of the soft-coefficient attention at the hard mask (finite also at zeros); with
    ``coeff_grad=False`` it is zero."""
    q, k, v = SMALL.qkv(jax.random.key(13))
    soft = jax.random.uniform(jax.random.key(14), (1, SMALL.H, SMALL.T, SMALL.S))
    hard = (soft > 0.5).astype(jnp.float32)
    st = lambda s: hard + s - jax.lax.stop_gradient(s)
    loss = lambda c, **kw: jnp.sum(ops.coefficient_attention(q, k, v, c, **kw) ** 2)
    g_st = jax.grad(lambda s: loss(st(s)))(soft)
    g_hard = jax.grad(lambda c: loss(c, implementation="reference"))(hard)
    harness.assert_close(g_st, g_hard, 1e-4, "straight-through")
    assert np.abs(np.asarray(g_st)[np.asarray(hard) == 0]).max() > 0
    assert not np.asarray(jax.grad(lambda c: loss(c, coeff_grad=False))(hard)).any()
    ones = ops.coefficient_attention(q, k, v, jnp.ones((1, 1, SMALL.T, SMALL.S)))
    harness.assert_close(ones, ops.attention(q, k, v), 2e-5, "all ones")
