"""The layers of zoo part 3 (issue 22): each module equals its op on its own projections (in one
``nnx.jit`` program, with gradients reaching every parameter), names the logical axes of all its
parameters, and meets the known answer of its paper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks, nn, ops, parallel, score_mods
from attnjax.nn import sharding
from tests import harness

X = harness.normal(jax.random.key(0), (2, 9, 16))
LOSS = lambda m, x: jnp.mean(m(x) ** 2)


def _annotated(model):
    assert sharding.unannotated(model) == []
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert all(a is None or a in parallel.LOGICAL_AXES for a in var.get_metadata()["out_sharding"])


# -- scored layers ---------------------------------------------------------------------------------


def test_neural_attention_layer_is_its_op():
    m = nn.NeuralAttention(2, 16, score_dim=3, hidden=4, rngs=nnx.Rngs(0))
    _annotated(m)

    def compare(m, x):
        qp, kp = m.scores_inputs(m.query(x), m.key(x))
        want = m.out(
            ops.neural_attention(
                qp, kp, m.value(x), m.mlp_params(), mask=masks.causal(), implementation="reference"
            )
        )
        return [(m(x), want)]

    harness.check_module_is_op(m, (X,), compare, what="NeuralAttention", loss=LOSS, tol=1e-4)


def test_rcmha_is_its_op_and_reduces_to_attention():
    m = nn.RCMHA(2, 16, max_distance=4, rngs=nnx.Rngs(0))
    _annotated(m)
    m.u[...] = 0.1 * jnp.ones_like(m.u[...])

    def compare(m, x):
        q, k, v = m.project(x)
        mod = score_mods.relative_logits(m.relative_table(q))
        want = m.out(
            ops.attention(q + m.u[...], k, v, mask=masks.causal(), score_mod=mod, implementation="reference")
        )
        return [(m(x), want)]

    harness.check_module_is_op(m, (X,), compare, what="RCMHA", loss=LOSS, tol=1e-4)
    # identity kernels (the init), W_R = 0, u = v = 0: standard attention on the projections
    m.rel.kernel[...] = jnp.zeros_like(m.rel.kernel[...])
    m.u[...] = jnp.zeros_like(m.u[...])
    plain = m.out(ops.attention(*harness.projections(m, X), mask=masks.causal()))
    harness.assert_close(m(X), plain, 1e-5, "RCMHA reduces to attention")


def test_rcmha_convolution_is_causal():
    m = nn.RCMHA(2, 16, max_distance=3, rngs=nnx.Rngs(1))
    m.conv_q[...] = jax.random.normal(jax.random.key(3), m.conv_q.shape)
    y = m(X)
    y2 = m(X.at[:, 6:].set(5.0))
    np.testing.assert_allclose(y[:, :6], y2[:, :6], rtol=1e-5, atol=1e-5)


def test_dual_attention_is_its_ops():
    m = nn.DualAttention(2, 2, 16, max_len=12, relations=3, rngs=nnx.Rngs(0))
    _annotated(m)

    def compare(m, x):
        s = ops.attention(m.query(x), m.key(x), m.value(x), mask=masks.causal(), implementation="reference")
        r = ops.relational_attention(*m.relational_inputs(x), mask=masks.causal(), implementation="reference")
        return [(m(x), m.out(jnp.concatenate([s, r], 2)))]

    harness.check_module_is_op(m, (X,), compare, what="DualAttention", loss=LOSS, tol=1e-4)
    with pytest.raises(ValueError, match="max_len"):
        m(jnp.zeros((1, 13, 16)))


# -- head-structure layers -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["add", "mul"])
def test_mhe_is_its_op(mode):
    m = nn.MHEAttention(4, 16, head_dim=6, mode=mode, mask=masks.causal(), rngs=nnx.Rngs(0))
    _annotated(m)
    compare = lambda m, x: [
        (m(x), m.out(ops.attention(*m.project(x), mask=masks.causal(), implementation="reference")))
    ]
    harness.check_module_is_op(m, (X,), compare, what=f"MHE {mode}", loss=LOSS)


def test_mhe_add_key_embedding_has_no_effect():
    """MHE-ADD: q . e^K_h is a per-query constant, which softmax ignores."""
    m = nn.MHEAttention(4, 16, mode="add", rngs=nnx.Rngs(0))
    y = m(X)
    m.embed_k[...] = 5.0 * jax.random.normal(jax.random.key(9), m.embed_k.shape)
    harness.assert_close(m(X), y, 1e-5, "e^K")


def test_pay_better_attention_known_answers():
    B, T, C, H = X.shape[0], X.shape[1], 16, 4
    slices = X.reshape(B, T, H, C // H)
    opt = nn.PayBetterAttention(H, C, kind="optimised", rngs=nnx.Rngs(0))
    _annotated(opt)
    # SDPA whose W_V is the slice selector is optimised attention
    selector = jnp.eye(C).reshape(C, H, C // H)
    sdpa = opt.out(ops.attention(opt.query(X), opt.key(X), jnp.einsum("btc,chd->bthd", X, selector)))
    harness.assert_close(opt(X), sdpa, 1e-5, "optimised == SDPA with W_V = slices")
    eff = nn.PayBetterAttention(H, C, kind="efficient", rngs=nnx.Rngs(1))
    harness.assert_close(eff(X), eff.out(ops.attention(eff.query(X), slices, slices)), 1e-5, "efficient")
    sup = nn.PayBetterAttention(H, C, kind="super", seq_len=T, rngs=nnx.Rngs(1))
    _annotated(sup)
    harness.assert_close(sup(X), eff(X), 1e-5, "super with W_A = I is efficient")
    harness.check_module_is_op(
        sup, (X,), lambda m, x: [(m(x), m.out(ops.attention(*m.project(x))))], what="super", loss=LOSS
    )
    with pytest.raises(ValueError, match="fixed length"):
        sup(X[:, :5])
    with pytest.raises(ValueError, match="kind"):
        nn.PayBetterAttention(H, C, kind="x", rngs=nnx.Rngs(0))


def test_minimal_attention_known_answers():
    sym = nn.MinimalAttention(2, 16, qk="symmetric", qk_dim=5, rngs=nnx.Rngs(0))
    _annotated(sym)
    s = sym.scores(X)
    np.testing.assert_allclose(s, s.transpose(0, 1, 3, 2), rtol=1e-5, atol=1e-5)
    harness.check_module_is_op(
        sym, (X,), lambda m, x: [(m(x), m.out(ops.attention(*m.project(x))))], what="symmetric", loss=LOSS
    )
    # collapsed W_QK = W_Q W_K^T (rescaled for the 1/sqrt(width) of C-wide vectors) is standard attention
    col = nn.MinimalAttention(2, 16, qk="collapsed", values="identity", rngs=nnx.Rngs(1))
    _annotated(col)
    wq, wk = (harness.normal(jax.random.key(i), (16, 2, 4)) for i in (5, 6))
    col.qk_proj.kernel[...] = jnp.einsum("chd,ehd->che", wq, wk) * np.sqrt(16 / 4)
    q, k = jnp.einsum("btc,chd->bthd", X, wq), jnp.einsum("btc,chd->bthd", X, wk)
    want = col.out(ops.attention(q, k, X.reshape(2, 9, 2, 8)))
    harness.assert_close(col(X), want, 1e-4, "collapsed == standard")


def test_diffqkv_layer_is_its_op():
    m = nn.DiffQKVAttention(
        4,
        16,
        num_k_heads=1,
        num_v_heads=2,
        k_head_dim=3,
        v_head_dim=5,
        q_aug_dim=24,
        value_top_k=4,
        rngs=nnx.Rngs(0),
    )
    _annotated(m)
    compare = lambda m, x: [
        (
            m(x),
            m.out(
                ops.diffqkv_attention(
                    *m.project(x), value_top_k=4, mask=masks.causal(), implementation="reference"
                )
            ),
        )
    ]
    harness.check_module_is_op(m, (X,), compare, what="DiffQKV", loss=LOSS)
