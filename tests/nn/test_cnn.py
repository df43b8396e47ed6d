"""attnjax.nn.cnn (zoo part 1, items 1.13-1.20): the known answers of each module's spec, their
logical parameter axes, and attention_diversity_loss's closed form against the pairwise one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import nn, ops, parallel
from attnjax.nn import sharding
from tests import harness

X = harness.normal(jax.random.key(0), (2, 5, 7, 8))


def zero(module, *names):
    """Sets the parameters whose path contains one of ``names`` (all if none) to zero."""
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if not names or any(n in map(str, path) for n in names):
            var.set_value(jnp.zeros_like(var.get_value()))
    return module


MODULES = {
    "cbam": lambda r: nn.cnn.CBAM(8, reduction=2, rngs=r),
    "cbam_bn": lambda r: nn.cnn.CBAM(8, reduction=2, norm="batch", rngs=r),
    "triplet": lambda r: nn.cnn.TripletAttention(kernel=3, rngs=r),
    "ela": lambda r: nn.cnn.ELA(8, kernel=5, groups=4, rngs=r),
    "ulsam": lambda r: nn.cnn.ULSAM(8, groups=4, rngs=r),
    "das": lambda r: nn.cnn.DeformableGate(8, alpha=0.5, rngs=r),
    "dau": lambda r: nn.cnn.DualAttentionUnit(8, reduction=2, rngs=r),
    "skff": lambda r: nn.cnn.SKFF(8, streams=2, rngs=r),
    "pam": lambda r: nn.cnn.PositionAttention(8, rngs=r),
    "cam": lambda r: nn.cnn.ChannelAttentionModule(),
    "tap": lambda r: nn.cnn.TokenAwarePooling(8, rngs=r),
}


@pytest.mark.parametrize("name", MODULES)
def test_every_parameter_has_logical_axes(name):
    model = MODULES[name](nnx.Rngs(0))
    assert sharding.unannotated(model) == []
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert all(a is None or a in parallel.LOGICAL_AXES for a in var.get_metadata()["out_sharding"])


def test_cbam_known_answers():
    m = zero(nn.cnn.CBAM(8, reduction=2, rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(m(X), 0.25 * X, rtol=1e-6)
    # the channel gate sees only spatial pools: invariant to permuting the positions
    m = nn.cnn.CBAM(8, reduction=2, rngs=nnx.Rngs(1))
    perm = jax.random.permutation(jax.random.key(2), 35)
    shuffle = lambda x: x.reshape(2, 35, 8)[:, perm].reshape(x.shape)
    np.testing.assert_allclose(m.channel(shuffle(X)), shuffle(m.channel(X)), rtol=1e-5, atol=1e-6)


def test_triplet_known_answers():
    np.testing.assert_allclose(zero(nn.cnn.TripletAttention(rngs=nnx.Rngs(0)))(X), 0.5 * X, rtol=1e-6)
    t = nn.cnn.TripletAttention(kernel=3, rngs=nnx.Rngs(1))
    cbam = nn.cnn.CBAM(8, reduction=2, kernel=3, rngs=nnx.Rngs(2))
    nnx.update(cbam.spatial, nnx.state(t.branches[2]))  # the identity branch is CBAM's spatial gate
    np.testing.assert_allclose(t.branches[2](X), cbam.spatial(X), rtol=1e-6)
    three = (
        sum(
            np.asarray(jnp.transpose(g(jnp.transpose(X, p)), p))
            for g, p in zip(t.branches, [(0, 3, 2, 1), (0, 1, 3, 2), (0, 1, 2, 3)])
        )
        / 3
    )
    np.testing.assert_allclose(t(X), three, rtol=1e-5, atol=1e-6)


def test_ela_known_answers():
    m = zero(nn.cnn.ELA(8, kernel=5, groups=4, rngs=nnx.Rngs(0)), "conv")
    beta = jnp.linspace(-1, 1, 8)
    m.norm.bias.set_value(beta)
    np.testing.assert_allclose(m(X), X * jax.nn.sigmoid(beta) ** 2, rtol=1e-5, atol=1e-6)
    # one shared conv and norm: transposing the map transposes the output
    m = nn.cnn.ELA(8, kernel=5, groups=4, rngs=nnx.Rngs(1))
    np.testing.assert_allclose(m(X.transpose(0, 2, 1, 3)), m(X).transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-6)


def test_ulsam_known_answers():
    m = nn.cnn.ULSAM(8, groups=4, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(m.maps(X).sum((1, 2)), 1.0, rtol=1e-5)
    zero(m, "point")  # constant logits: each map is 1 / hw
    np.testing.assert_allclose(m(X), X * (1 + 1 / 35), rtol=1e-5)


def test_deformable_gate_known_answers():
    m = nn.cnn.DeformableGate(8, alpha=0.5, rngs=nnx.Rngs(0))
    z = harness.normal(jax.random.key(3), (2, 5, 7, 4))
    # zero offsets: the deformable conv is a plain 3x3 convolution with the same weights
    plain = jax.lax.conv_general_dilated(
        z,
        m.deform[...].reshape(3, 3, 4, 8),
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest",
    )
    np.testing.assert_allclose(m.deformable_conv(z, jnp.zeros((2, 5, 7, 18))), plain, rtol=1e-5, atol=1e-5)
    # an offset of exactly one pixel right reads the map shifted left (away from the left
    # border, where the shifted map's padding holds what the offset still reads)
    off = jnp.zeros((2, 5, 7, 9, 2)).at[..., 1].set(1.0).reshape(2, 5, 7, 18)
    shifted = jnp.pad(z, ((0, 0), (0, 0), (0, 1), (0, 0)))[:, :, 1:]
    np.testing.assert_allclose(
        m.deformable_conv(z, off)[:, :, 1:],
        m.deformable_conv(shifted, jnp.zeros((2, 5, 7, 18)))[:, :, 1:],
        rtol=1e-5,
        atol=1e-5,
    )
    y = m(X)
    assert np.all(np.abs(np.asarray(y)) <= np.abs(np.asarray(X)) + 1e-6)
    # the offsets train: the gradient reaches the offset conv through the sampling
    m.offsets.bias.set_value(0.3 * jnp.ones(18))
    g = nnx.grad(lambda m: jnp.sum(m(X) ** 2))(m)
    assert float(jnp.abs(g.offsets.kernel[...]).sum()) > 0


def test_dau_and_skff_known_answers():
    dau = nn.cnn.DualAttentionUnit(8, reduction=2, rngs=nnx.Rngs(0))
    assert dau(X).shape == X.shape
    np.testing.assert_allclose(zero(dau, "fuse")(X), X)  # a zero fusion conv leaves the residual
    skff = nn.cnn.SKFF(8, streams=3, rngs=nnx.Rngs(1))
    streams = [X, 2 * X, -X]
    np.testing.assert_allclose(skff.weights(streams).sum(0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(skff([X, X, X]), X, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="streams"):
        skff([X, X])


def test_danet_known_answers():
    pam, cam = nn.cnn.PositionAttention(8, rngs=nnx.Rngs(0)), nn.cnn.ChannelAttentionModule()
    np.testing.assert_allclose(pam(X), X)  # gamma = beta = 0 at init: the identity
    np.testing.assert_allclose(cam(X), X)
    pam.gamma.set_value(jnp.ones(1))
    cam.beta.set_value(jnp.ones(1))
    flat = np.asarray(X, np.float64).reshape(2, 35, 8)
    b, c, d = (np.asarray(f(X)).reshape(2, 35, -1) for f in (pam.query, pam.key, pam.value))
    s = jax.nn.softmax(np.einsum("bic,bjc->bij", b, c), -1)
    np.testing.assert_allclose(
        pam(X).reshape(2, 35, 8), np.einsum("bij,bjc->bic", s, d) + flat, rtol=1e-4, atol=1e-5
    )
    energy = np.einsum("bni,bnj->bij", flat, flat)
    attn = jax.nn.softmax(energy.max(-1, keepdims=True) - energy, -1)  # the official form
    np.testing.assert_allclose(
        cam(X).reshape(2, 35, 8), np.einsum("bij,bnj->bni", attn, flat) + flat, rtol=1e-4, atol=1e-5
    )


def test_tap_known_answers():
    np.testing.assert_allclose(
        nn.cnn.TokenAwarePooling(8, pool_sizes=(1,), rngs=nnx.Rngs(0))(X), X, rtol=1e-6
    )
    m = nn.cnn.TokenAwarePooling(
        8, pool_sizes=(1, 3), rngs=nnx.Rngs(0)
    )  # zero logits: the mean of the poolings
    interior = (
        X[:, 1:4, 1:6]
        + X[:, :3, :5]
        + X[:, :3, 1:6]
        + X[:, :3, 2:7]
        + X[:, 1:4, :5]
        + X[:, 1:4, 2:7]
        + X[:, 2:5, :5]
        + X[:, 2:5, 1:6]
        + X[:, 2:5, 2:7]
    ) / 9
    np.testing.assert_allclose(m(X)[:, 1:4, 1:6], (X[:, 1:4, 1:6] + interior) / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pool_sizes"):
        nn.cnn.TokenAwarePooling(8, pool_sizes=(2,), rngs=nnx.Rngs(0))


def test_attention_diversity_loss():
    a = jax.nn.softmax(harness.normal(jax.random.key(4), (2, 3, 6, 9)), -1)
    harness.check_vjp(
        lambda a: ops.attention_diversity_loss(a, implementation="xla"),
        lambda a: ops.attention_diversity_loss(a, implementation="reference"),
        (a,),
        jnp.float32,
    )
    assert float(ops.attention_diversity_loss(jnp.ones((1, 2, 4, 5)))) == pytest.approx(1.0)
    assert float(ops.attention_diversity_loss(jnp.eye(4)[None, None])) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="2 query rows"):
        ops.attention_diversity_loss(jnp.ones((1, 1, 1, 4)))


def test_shape_errors():
    with pytest.raises(ValueError, match="channel-last"):
        nn.cnn.CBAM(8, reduction=2, rngs=nnx.Rngs(0))(X[..., :4])
    with pytest.raises(ValueError, match="divide"):
        nn.cnn.ULSAM(8, groups=3, rngs=nnx.Rngs(0))
