"""Head-structure and factored-score variants (issue 22): DiffQKV's selective value fetching,
relational attention and per-head key-set modulation, each against its dense reference (values
and gradients, f32 and bf16, odd sizes) plus the known answers of the spec."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, ops, score_mods
from tests import harness


def _x(key, *shape, bf16_exact=False):
    x = harness.normal(jax.random.key(key), shape)
    # inputs representable in bf16, so that top-k picks the same keys at either precision
    return x.astype(jnp.bfloat16).astype(jnp.float32) if bf16_exact else x


# -- 3.13 DiffQKV ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,renorm,mask,dtype",
    [
        (4, False, masks.causal(), jnp.float32),
        (3, True, None, jnp.float32),
        (5, False, masks.causal(), jnp.bfloat16),
    ],
    ids=["top4-causal-f32", "top3-renorm-f32", "top5-causal-bf16"],
)
def test_diffqkv_selective_values_equal_dense(n, renorm, mask, dtype):
    """Fewer key heads (1) than value heads (2), D != E, odd T; tiles of 8 queries."""
    args = (_x(0, 2, 11, 4, 6, bf16_exact=True), _x(1, 2, 11, 1, 6, bf16_exact=True), _x(2, 2, 11, 2, 5))
    fn = lambda impl: (
        lambda q, k, v: ops.diffqkv_attention(
            q, k, v, value_top_k=n, renormalize=renorm, mask=mask, block_q=8, implementation=impl
        )
    )
    harness.check_vjp(fn("xla"), fn("reference"), args, dtype, what="diffqkv")


def test_diffqkv_known_answers():
    """Equal key and value head counts is GQA; reading all S values is exact attention."""
    q, k, v = _x(0, 1, 9, 4, 6), _x(1, 1, 9, 2, 6), _x(2, 1, 9, 2, 3)
    gqa = ops.attention(q, k, v, mask=masks.causal(), implementation="reference")
    for impl in ("xla", "reference"):
        got = ops.diffqkv_attention(q, k, v, value_top_k=9, mask=masks.causal(), implementation=impl)
        harness.assert_close(got, gqa, 1e-5, f"top-S {impl}")
    harness.assert_close(ops.diffqkv_attention(q, k, v, mask=masks.causal()), gqa, 1e-5, "no selection")


def test_diffqkv_validation():
    q, k, v = _x(0, 1, 9, 4, 6), _x(1, 1, 9, 2, 6), _x(2, 1, 9, 3, 3)
    with pytest.raises(ValueError, match="value has 3 heads"):
        ops.diffqkv_attention(q, k, v, value_top_k=2)
    with pytest.raises(ValueError, match="value_top_k"):
        ops.diffqkv_attention(q, k, _x(2, 1, 9, 2, 3), value_top_k=10)


# -- 3.16 relational attention ----------------------------------------------------------------------


def _relational_args(T=7, S=10, H=4, K=2, L=3, R=2, E=5):
    return (
        _x(0, 2, T, H, 4),
        _x(1, 2, S, K, 4),
        _x(2, 2, T, H, L, R),
        _x(3, 2, S, K, L, R),
        _x(4, 2, S, K, E),
        _x(5, H, L, E),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_relational_factored_equals_explicit_relations(dtype):
    fn = lambda impl: lambda *a: ops.relational_attention(*a, mask=masks.causal(), implementation=impl)
    harness.check_vjp(fn("xla"), fn("reference"), _relational_args(), dtype, what="relational")


def test_relational_by_hand():
    """One query: sum_j alpha_j (W_r r_j + s_j) with r_j written in numpy."""
    args = [np.asarray(a, np.float64) for a in _relational_args(T=1, S=6, H=1, K=1)]
    q, k, qr, kr, s, w = args
    logit = (q[0, 0, 0] @ k[0, :, 0].T) / 2.0
    alpha = np.exp(logit - logit.max()) / np.exp(logit - logit.max()).sum()
    r = np.einsum("lr,slr->sl", qr[0, 0, 0], kr[0, :, 0])
    want = alpha @ (r @ w[0] + s[0, :, 0])
    got = ops.relational_attention(*(jnp.asarray(a, jnp.float32) for a in args))
    np.testing.assert_allclose(got[0, 0, 0], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="w_rel"):
        ops.relational_attention(*(jnp.asarray(a, jnp.float32) for a in args[:5]), jnp.zeros((1, 2, 5)))


# -- 3.20 training-free head modulation -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_key_set_bias_blockwise_equals_dense(dtype):
    q, k, v = _x(0, 2, 9, 4, 6), _x(1, 2, 12, 2, 6), _x(2, 2, 12, 2, 3)
    sel = jnp.arange(12)[None] % 3 == jnp.array([[0], [1]])  # [2, 12]
    gamma = jnp.array([1.0, 2.0, 0.5, 3.0])

    def fn(q, k, v, g):
        mod = score_mods.key_set_bias(sel, g)
        return ops.attention(q, k, v, score_mod=mod, implementation="xla", block_sizes=ops.BlockSizes(8, 8))

    def ref(q, k, v, g):
        bias = jnp.where(sel[:, None, None, :], jnp.log(g)[None, :, None, None], 0.0)
        return ops.attention(q, k, v, bias=bias, implementation="reference")

    harness.check_vjp(fn, ref, (q, k, v, gamma), dtype, what="key_set_bias")


def test_key_set_bias_gamma_one_is_identity_and_scales_weights():
    q, k, v = _x(0, 1, 5, 2, 4), _x(1, 1, 7, 2, 4), _x(2, 1, 7, 2, 3)
    sel = jnp.arange(7)[None] < 3
    base = ops.attention(q, k, v)
    harness.assert_close(
        ops.attention(q, k, v, score_mod=score_mods.key_set_bias(sel, 1.0)), base, 1e-6, "gamma 1"
    )
    # gamma multiplies the selected keys' unnormalized weights: with one-hot values the output
    # is the weight matrix, and the ratio selected / unselected grows by gamma
    eye = jnp.broadcast_to(jnp.eye(7)[None, :, None], (1, 7, 2, 7))
    w0 = ops.attention(q, k, eye)
    w1 = ops.attention(q, k, eye, score_mod=score_mods.key_set_bias(sel, 4.0))
    np.testing.assert_allclose((w1[..., 0] / w1[..., 5]) / (w0[..., 0] / w0[..., 5]), 4.0, rtol=1e-4)


# -- 3.8 attention buckets -----------------------------------------------------------------------


def test_rope_scores_depend_on_offsets_only():
    q, k = _x(0, 1, 6, 2, 8), _x(1, 1, 6, 2, 8)
    s = jnp.einsum("bthd,bshd->bhts", ops.rope(q, 500.0), ops.rope(k, 500.0))
    shifted = jnp.einsum(
        "bthd,bshd->bhts", ops.rope(q, 500.0, jnp.arange(6) + 7), ops.rope(k, 500.0, jnp.arange(6) + 7)
    )
    np.testing.assert_allclose(s, shifted, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="even head dim"):
        ops.rope(_x(0, 1, 6, 2, 5))


def test_attention_buckets_known_answers():
    """One bucket, or equal bases, is the base model; two bases average the two runs' probabilities."""
    from flax import nnx

    from attnjax import nn
    from attnjax.nn import sharding

    m = nn.RoPEAttention(2, 16, rngs=nnx.Rngs(0))
    assert sharding.unannotated(m) == []
    x = _x(3, 2, 7, 16)
    graphdef, state = nnx.split(m)
    fwd = lambda b: nnx.merge(graphdef, state)(x, base=b)

    @jax.jit
    def run():
        single = jax.vmap(fwd)(jnp.array([1e4, 100.0, 3e4]))  # the model under each base alone
        cases = (
            ((1e4,), "probs"),
            ((1e4, 1e4, 1e4), "probs"),
            ((100.0, 3e4), "probs"),
            ((100.0, 3e4), "logits"),
        )
        return single, [ops.attention_buckets(fwd, list(b), combine=c) for b, c in cases]

    single, (one, equal, two, two_logits) = run()
    base = jax.nn.log_softmax(single[0], -1)
    harness.assert_close(single[0], m(x), 1e-5, "vmapped base == the layer's default")
    harness.assert_close(one, base, 1e-5, "one bucket")
    harness.assert_close(equal, base, 1e-5, "equal bases")
    p = (jax.nn.softmax(single[1], -1) + jax.nn.softmax(single[2], -1)) / 2
    harness.assert_close(jnp.exp(two), p, 1e-5, "two bases")
    harness.assert_close(two_logits, jax.nn.log_softmax((single[1] + single[2]) / 2, -1), 1e-5, "logits")
    with pytest.raises(ValueError, match="combine"):
        ops.attention_buckets(fwd, [1.0], combine="max")
