"""Attention-replacement, pooling and routing layers of zoo part 3 (issue 22): Gaussian adaptive
attention, LAMA pooling, NiNformer's gate; each against its equations written in numpy and its
paper's known answer, with every parameter naming its logical axes and receiving gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import nn, parallel
from attnjax.nn import sharding
from tests import harness

X = harness.normal(jax.random.key(0), (2, 9, 16))


def _annotated(model):
    assert sharding.unannotated(model) == []
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert all(a is None or a in parallel.LOGICAL_AXES for a in var.get_metadata()["out_sharding"])


def _trains(model, x):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    g = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert all(np.isfinite(np.asarray(a)).all() for a in g) and sum(float(jnp.abs(a).sum()) for a in g) > 0


# -- 3.10 Gaussian adaptive attention -------------------------------------------------------------


def test_gaussian_adaptive_attention_is_the_official_formula():
    m = nn.GaussianAdaptiveAttention(norm_axis=1, num_heads=2, num_gaussians=3, rngs=nnx.Rngs(0))
    _annotated(m)
    m.offsets[...] = jnp.array([[0.1, -0.2, 0.0], [0.3, 0.0, -0.1]])
    x = np.asarray(X, np.float64)
    off, c = np.asarray(m.offsets[...], np.float64), np.asarray(m.scales[...], np.float64)
    want = []
    for h, (a, b) in enumerate([(0, 4), (4, 9)]):  # 9 tokens over 2 heads: the last takes the remainder
        chunk = x[:, a:b]
        mean, var = chunk.mean(1, keepdims=True), chunk.var(1, ddof=1, keepdims=True) + 1e-8
        mix = 1.0
        for g in range(3):
            y = (chunk - (mean + off[h, g])) / np.sqrt(var)
            mix = mix * np.exp(-(y**2) / (2 * c[h, g] ** 2)) / np.sqrt(2 * np.pi * c[h, g] ** 2)
        want.append(chunk * mix / np.maximum(mix.sum(1, keepdims=True), 1e-8))
    np.testing.assert_allclose(m(X), np.concatenate(want, 1), rtol=1e-4, atol=1e-6)
    _trains(m, X)


def test_gaussian_weights_sum_to_one_and_are_uniform_on_constants():
    m = nn.GaussianAdaptiveAttention(norm_axis=1, num_heads=3, num_gaussians=2, rngs=nnx.Rngs(1))
    w = m.weights(X)
    for a, b in m.chunks(9):
        np.testing.assert_allclose(w[:, a:b].sum(1), 1.0, rtol=1e-5)
    w = m.weights(jnp.full((2, 9, 4), 3.0))
    np.testing.assert_allclose(w, 1.0 / 3.0, rtol=1e-5)
    with pytest.raises(ValueError, match="fewer than num_heads"):
        m(jnp.ones((1, 2, 4)))


# -- 3.17 LAMA -----------------------------------------------------------------------------------


def test_lama_full_rank_is_bilinear_pooling():
    """Rank r = C with P_k = W_k, Q_k = I: a_k = softmax_i(c^T W_k h_i), M_k = sum_i a_ik h_i."""
    m = nn.LAMAPooling(16, num_heads=2, rank=16, rngs=nnx.Rngs(0))
    _annotated(m)
    w = harness.normal(jax.random.key(3), (2, 16, 16), scale=0.3)
    m.p[...], m.q[...] = w, jnp.broadcast_to(jnp.eye(16), (2, 16, 16))
    h = np.asarray(X, np.float64)
    c = h.mean(1)
    e = np.einsum("bc,kcd,btd->bkt", c, np.asarray(w, np.float64), h)
    a = np.exp(e - e.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    np.testing.assert_allclose(m(X), np.einsum("bkt,btc->bkc", a, h), rtol=1e-4, atol=1e-5)
    _trains(nn.LAMAPooling(16, num_heads=2, rank=3, activation=jnp.tanh, rngs=nnx.Rngs(1)), X)


# -- 3.18 NiNformer --------------------------------------------------------------------------------


def test_ninformer_gate_of_one_is_a_linear_layer():
    m = nn.NiNformerGate(16, seq_len=9, rngs=nnx.Rngs(0))
    _annotated(m)
    _trains(m, X)
    g = m.gate(X)
    assert float(g.min()) > 0 and float(g.max()) < 1
    harness.assert_close(m(X), m.value(X) * g, 1e-6, "Y = (X W_v) * G")
    m.channel2.bias[...] = jnp.full((16,), 60.0)  # G = sigmoid(large) = 1
    harness.assert_close(m(X), m.value(X), 1e-6, "G = 1")
    with pytest.raises(ValueError, match="seq_len=9"):
        m(X[:, :5])


# -- 3.11 Skim-attention -------------------------------------------------------------------------


def test_skim_attention_is_layout_only():
    """The module is attention(layout q, layout k, text v); tokens with identical boxes get
    identical attention rows, so identical outputs whatever their text."""
    m = nn.SkimAttention(2, 16, layout_features=8, num_coords=50, rngs=nnx.Rngs(0))
    _annotated(m)
    boxes = jax.random.randint(jax.random.key(1), (2, 9, 4), 0, 50).at[:, 5].set(jnp.array([3, 4, 10, 12]))
    boxes = boxes.at[:, 7].set(jnp.array([3, 4, 10, 12]))
    y = m(X, boxes)
    np.testing.assert_allclose(y[:, 5], y[:, 7], rtol=1e-5, atol=1e-6)
    from attnjax import ops

    q, k = m.layout_qk(boxes)
    harness.assert_close(y, m.out(ops.attention(q, k, m.value(X))), 1e-6, "skim == op")
    harness.assert_close(m(X, qk=(q, k)), y, 1e-6, "shared qk")
    grads = nnx.grad(lambda mm: jnp.mean(mm(X, boxes) ** 2))(m)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(nnx.state(grads, nnx.Param)))
    kept = nn.skim_mask(q, k, 3)
    out = ops.attention(q, k, m.value(X), mask=kept, implementation="reference")
    assert out.shape == (2, 9, 2, 8)
    with pytest.raises(ValueError, match="exactly one"):
        m(X)


# -- 3.19 SHRP -------------------------------------------------------------------------------------


def test_shrp_top1_routing_usage_and_pruning():
    from attnjax import ops

    m = nn.SHRPAttention(4, 16, rngs=nnx.Rngs(0))
    _annotated(m)
    res = ops.moh_attention(m.query(X), m.key(X), m.value(X), m.router(X), top_k=1, convention="official")
    harness.assert_close(m(X), m.expander(res.out.sum(2)), 1e-5, "top-1 MoH")
    choice = np.asarray(jnp.argmax(m.router(X), -1))  # [B, T]
    np.testing.assert_array_equal(np.asarray(m.usage[...]), np.bincount(choice.ravel(), minlength=4))
    # drop the least used head: tokens that never chose it are unchanged
    drop = int(np.argmin(np.bincount(choice.ravel(), minlength=4)))
    pruned = m.prune([h for h in range(4) if h != drop])
    assert pruned.query.kernel.shape == (16, 3, 4) and pruned.usage.shape == (3,)
    keep = choice != drop
    np.testing.assert_allclose(np.asarray(pruned(X))[keep], np.asarray(m(X))[keep], rtol=1e-5, atol=1e-6)
    _trains(m, X)
    with pytest.raises(ValueError, match="keep"):
        m.prune([])
