"""The zoo part 1 token-level vision NNX modules (DaViT, CrossViT, TNT, BoxRPB, multi-scale
deformable attention): the known answers of the specs and module == op checks. (Split from
test_vision_zoo.py to keep each file fast.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import nn, ops, score_mods
from tests import harness

MAP = harness.normal(jax.random.key(0), (2, 6, 6, 8))


def zero(module, *names):
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if not names or any(n in map(str, path) for n in names):
            var.set_value(jnp.zeros_like(var.get_value()))
    return module


def test_davit_channel_attention_official_form_and_equivariance():
    m = nn.ChannelGroupAttention(2, 8, rngs=nnx.Rngs(0))
    x = MAP.reshape(2, 36, 8)
    q, k, v = (np.asarray(t, np.float64).reshape(2, 36, 2, 4) for t in jnp.split(m.qkv(x), 3, -1))
    attn = jax.nn.softmax(np.einsum("bnhi,bnhj->bhij", k * 4**-0.5, v), -1)  # official: (k*scale)^T v
    expected = np.einsum("bhij,bnhj->bnhi", attn, q).reshape(2, 36, 8)
    np.testing.assert_allclose(m(x), m.proj(jnp.asarray(expected, jnp.float32)), rtol=1e-4, atol=1e-5)
    perm = jax.random.permutation(jax.random.key(1), 36)
    np.testing.assert_allclose(m(x[:, perm]), m(x)[:, perm], rtol=1e-4, atol=1e-5)
    assert nn.DaViTBlock(2, 8, kind="spatial", window=3, rngs=nnx.Rngs(0))(MAP).shape == MAP.shape


def test_crossvit_changes_only_the_cls():
    m = nn.CrossViTFusion(8, 12, num_heads=2, rngs=nnx.Rngs(0))
    xs, xl = harness.normal(jax.random.key(1), (2, 10, 8)), harness.normal(jax.random.key(2), (2, 5, 12))
    ys, yl = m(xs, xl)
    np.testing.assert_array_equal(ys[:, 1:], xs[:, 1:])
    np.testing.assert_array_equal(yl[:, 1:], xl[:, 1:])
    assert not np.allclose(ys[:, 0], xs[:, 0])
    # W_q = 0: the CLS query attends uniformly, so it receives the mean of v over the N + 1 tokens
    tok = zero(nn.CrossAttentionToken(2, 12, rngs=nnx.Rngs(3)), "query")
    z = harness.normal(jax.random.key(4), (2, 6, 12))
    mean_v = tok.value(tok.norm(z)).mean(1, keepdims=True)
    np.testing.assert_allclose(tok(z), z[:, :1] + tok.out(mean_v), rtol=1e-5, atol=1e-6)


def test_tnt_fusion():
    m = nn.TNTBlock(8, 4, words=4, outer_heads=2, inner_heads=2, rngs=nnx.Rngs(0))
    words, patches = (
        harness.normal(jax.random.key(1), (2, 12, 4)),
        harness.normal(jax.random.key(2), (2, 4, 8)),
    )
    y, z = m(words, patches)
    assert y.shape == words.shape and z.shape == patches.shape
    _, z2 = m(2 * words + 1, patches)
    assert not np.allclose(z, z2)
    zero(m, "proj")  # FC = 0: the outer stream does not see the words
    _, z1 = m(words, patches)
    _, z2 = m(2 * words + 1, patches)
    np.testing.assert_allclose(z1, z2, rtol=1e-6)
    with pytest.raises(ValueError, match="words"):
        m(words[:, :8], patches)


def test_boxrpb_bias_is_maximal_inside_the_box():
    m = nn.BoxRPBCrossAttention(1, 8, hidden=4, rngs=nnx.Rngs(0))
    # a hand-set MLP: -(|d_1| + |d_2|) through relu(d) + relu(-d)
    w1 = jnp.array([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]])
    for mlp in (m.mlp_x, m.mlp_y):
        mlp[0].kernel.set_value(w1)
        mlp[0].bias.set_value(jnp.zeros(4))
        mlp[1].kernel.set_value(-jnp.ones((4, 1)))
    boxes = jnp.array([[[2.0, 1.0, 5.0, 3.0]]])  # x1, y1, x2, y2 in pixels
    by, bx = m.biases(boxes, (5, 8))
    dense = by[0, 0, :, None, 0] + bx[0, 0, None, :, 0]  # [h, w]
    inside = np.zeros((5, 8), bool)
    inside[1:3, 2:5] = True  # pixel centres (i + 0.5) inside [1, 3] x [2, 5]
    assert np.allclose(dense[inside], dense.max()) and np.all(dense[~inside] < dense.max())
    # the module is the op with the separable score mod (no [M, h w] bias)
    q, mem = harness.normal(jax.random.key(1), (1, 1, 8)), harness.normal(jax.random.key(2), (1, 40, 8))
    harness.check_module_is_op(
        m,
        (q, boxes, mem),
        lambda m, q, b, mem: [
            (
                m(q, b, mem, (5, 8)),
                m.out(
                    ops.attention(
                        m.query(q),
                        m.key(mem),
                        m.value(mem),
                        score_mod=score_mods.separable_bias(*m.biases(b, (5, 8)), 8),
                    )
                ),
            )
        ],
    )


def test_deformable_module_samples_at_the_reference_point():
    m = nn.MSDeformableAttention(2, 8, num_levels=1, num_points=1, rngs=nnx.Rngs(0))
    zero(m, "sampling_offsets")  # no offsets: every point is the reference point
    value = harness.normal(jax.random.key(1), (2, 20, 8))
    ref = jnp.array([[[(2 + 0.5) / 5, (1 + 0.5) / 4]]] * 2)  # the centre of pixel (row 1, col 2)
    query = harness.normal(jax.random.key(2), (2, 1, 8))
    out = m(query, ref, value, [(4, 5)])
    np.testing.assert_allclose(
        out, m.output_proj(m.value_proj(value)[:, 1 * 5 + 2][:, None]), rtol=1e-5, atol=1e-6
    )
    # the ring init: head m's first point sits along angle 2 pi m / M, one level pixel away
    m = nn.MSDeformableAttention(4, 8, num_levels=2, num_points=2, rngs=nnx.Rngs(0))
    bias = m.sampling_offsets.bias[...]
    np.testing.assert_allclose(bias[:, 0, 0], [[1, 0], [0, 1], [-1, 0], [0, -1]], atol=1e-6)
    np.testing.assert_allclose(bias[:, 1, 1], 2 * bias[:, 1, 0], atol=1e-6)
    with pytest.raises(ValueError, match="levels"):
        m(query, ref, value, [(4, 5)])


def test_catanet_module_is_its_op_and_moves_its_centres():
    m = nn.CATANetAttention(2, 8, num_centers=3, group=4, rngs=nnx.Rngs(0))
    x = harness.normal(jax.random.key(1), (2, 13, 8))

    def compare(m, x):
        mu = m.centers[...][None]
        op = ops.token_aggregation_attention(
            *harness.projections(m, x),
            ops.cosine_assign(x, m.centers[...]),
            group=4,
            center_k=m.key(mu),
            center_v=m.value(mu),
        )
        return [(m(x), m.out(op))]

    harness.check_module_is_op(m, (x,), compare, what="catanet")
    before = m.centers[...]
    m(x, update=True)
    assert not np.allclose(m.centers[...], before)
    # the centres are state, not parameters: an optimizer over nnx.Param leaves them alone
    assert "centers" not in str(nnx.state(m, nnx.Param))
