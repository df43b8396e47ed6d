"""moh_attention: gates and load-balance loss by hand, the dense path against attention x gates,
and the skipping path against the dense one (values, gradients, and that it really skips)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, ops, score_mods
from attnjax.ops.moh import moh_gates
from tests import harness
from tests.harness import Shape


def _logits(B, T, hs, hr, key=jax.random.key(5)):
    k1, k2, k3 = jax.random.split(key, 3)
    return (jax.random.normal(k1, (B, T, hr)), jax.random.normal(k2, (B, T, hs)) if hs else None,
            jax.random.normal(k3, (B, T, 2)) if hs else None)


def test_gates_and_aux_loss_by_hand():
    B, T, hs, hr, top_k = 2, 5, 2, 4, 2
    routed, shared, mix = _logits(B, T, hs, hr)
    gates, aux = moh_gates(routed, top_k, shared, mix, num_shared=hs)
    r, s, m = (np.asarray(x, np.float64) for x in (routed, shared, mix))
    softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
    p, alpha = softmax(r), softmax(m)
    top = np.argsort(-r, axis=-1)[..., :top_k]
    sel = np.zeros_like(r)
    np.put_along_axis(sel, top, 1.0, axis=-1)
    expected = np.concatenate([alpha[..., :1] * softmax(s), alpha[..., 1:] * p * sel], -1)
    np.testing.assert_allclose(gates, expected, rtol=1e-5, atol=1e-7)
    f, P = sel.reshape(-1, hr).mean(0), p.reshape(-1, hr).mean(0)
    np.testing.assert_allclose(aux, (f * P).sum(), rtol=1e-5)
    assert ((np.asarray(gates[..., hs:]) > 0).sum(-1) == top_k).all()


def test_aux_loss_is_top_k_over_hr_when_uniform():
    # Uniform probabilities P_h = 1/4; whatever heads are picked, sum_h f_h = top_k, so the
    # loss is top_k / H_r = 0.5 (its minimum over selections for these probabilities).
    _, aux = moh_gates(jnp.zeros((1, 8, 4)), 2)
    np.testing.assert_allclose(aux, 0.5, rtol=1e-6)


def _qkv(shape: Shape, key=jax.random.key(0)):
    return shape.qkv(key)


SHAPE = Shape(B=2, T=37, S=37, H=6, K=3, D=8, E=8)  # T not a multiple of the block, GQA


def test_dense_path_is_attention_times_gates():
    q, k, v = _qkv(SHAPE)
    routed, shared, mix = _logits(2, 37, 2, 4)
    res = jax.jit(functools.partial(ops.moh_attention, top_k=2, mask=masks.causal()))(q, k, v, routed, shared_logits=shared, mix_logits=mix)
    heads = ops.attention(q, k, v, mask=masks.causal(), implementation="reference")
    harness.assert_close(res.out, heads * res.gates[..., None], 1e-5, "dense moh")
    assert res.out.shape == (2, 37, 6, 8) and res.gates.shape == (2, 37, 6) and res.aux_loss.shape == ()


def _make_mask(kind):
    seg = jnp.sort(jax.random.randint(jax.random.key(9), (2, 37), 0, 3), axis=1)
    return {
        "none": None,
        "causal": masks.causal(),
        "window": masks.sliding_window(5),
        "document_causal": masks.document(seg) & masks.causal(),
        "prefix_lm": masks.prefix_lm(jnp.array([4, 20])),
    }[kind]


@pytest.mark.parametrize(
    "kind", ["causal", "document_causal", *(pytest.param(k, marks=pytest.mark.slow) for k in ("none", "window", "prefix_lm"))]
)
def test_skipping_equals_dense(kind):
    """Values and gradients (q, k, v and the router logits) of the skipping path equal the dense."""
    mask = _make_mask(kind)
    q, k, v = _qkv(SHAPE)
    routed, shared, mix = _logits(2, 37, 2, 4)

    def run(skip):
        def f(q, k, v, routed, shared, mix):
            return ops.moh_attention(q, k, v, routed, top_k=1, shared_logits=shared, mix_logits=mix, mask=mask,
                                     skip_unselected=skip, block_q=8).out
        return f

    harness.check_vjp(run(True), run(False), (q, k, v, routed, shared, mix), jnp.float32, what=kind)


def test_skipping_path_sees_global_positions():
    """Score mods and dropout act on global indices in each skipped-to block (ALiBi distances,
    dropped weights), so the skipping path equals the dense one with them too."""
    q, k, v = _qkv(SHAPE)
    routed, shared, mix = _logits(2, 37, 2, 4)
    kw = dict(top_k=1, shared_logits=shared, mix_logits=mix, mask=masks.causal(), block_q=8,
              score_mod=score_mods.alibi(score_mods.alibi_slopes(SHAPE.H)), dropout_rate=0.3,
              dropout_key=jax.random.key(4))
    run = lambda skip: lambda q, k, v: ops.moh_attention(q, k, v, routed, skip_unselected=skip, **kw).out
    harness.check_vjp(run(True), run(False), (q, k, v), jnp.float32)


def test_skipping_really_skips():
    """Poison (NaN) the queries of a (batch, block, head) no token selected: the dense path
    multiplies NaN by a zero gate and gives NaN; the skipping path never computes it."""
    B, T, H, D = 1, 16, 3, 4
    q, k, v = Shape(B=B, T=T, S=T, H=H, K=H, D=D, E=D).qkv(jax.random.key(0))
    # No shared heads, 3 routed, top-1; block 0 (tokens 0-7) routes only to head 0.
    routed = jnp.zeros((B, T, H)).at[:, :8, 0].set(5.0).at[:, 8:, 1].set(5.0)
    q = q.at[:, :8, 2].set(jnp.nan)  # head 2 of block 0 is unselected
    kw = dict(top_k=1, block_q=8)
    sparse = ops.moh_attention(q, k, v, routed, skip_unselected=True, **kw).out
    dense = ops.moh_attention(q, k, v, routed, **kw).out
    assert np.isfinite(np.asarray(sparse)).all()
    assert np.isnan(np.asarray(dense)).any()


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(top_k=5), ValueError, "top_k=5 must be <="),
        (dict(top_k=0), ValueError, "top_k must be >= 1"),
        (dict(top_k=1, routed_logits=jnp.ones((2, 37, 7))), ValueError, "expected 1 .. H=6"),
        (dict(top_k=1, routed_logits=jnp.ones((2, 36, 4))), ValueError, "first two axes"),
        (dict(top_k=1, shared_logits=jnp.ones((2, 37, 3))), ValueError, "shared_logits has shape"),
        (dict(top_k=1, routed_logits=jnp.ones((2, 37, 6)), mix_logits=jnp.ones((2, 37, 2))), ValueError, "no shared heads"),
        (dict(top_k=1, skip_unselected=True, bias=jnp.zeros((1, 1, 37, 37))), NotImplementedError, "bias"),
    ],
    ids=["top_k_big", "top_k_zero", "too_many_routed", "bad_len", "shared_shape", "mix_without_shared", "skip_bias"],
)
def test_validation(kw, err, match):
    q, k, v = _qkv(SHAPE)
    routed = kw.pop("routed_logits", jnp.ones((2, 37, 4)))
    with pytest.raises(err, match=match):
        ops.moh_attention(q, k, v, routed, **kw)
