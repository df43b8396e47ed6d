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
