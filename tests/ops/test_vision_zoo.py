"""Zoo part 1: bilinear sampling (C1) and multi-scale deformable attention (1.11), each against
its dense reference (values and gradients, coordinates included; f32 and bf16, odd sizes) plus
the known answers of the spec."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import ops
from tests import harness

F32, BF16 = jnp.float32, jnp.bfloat16
# bf16 of each path runs in the slow tier (the fast tier keeps f32 and one bf16 sampling case)
DTYPES = pytest.mark.parametrize(
    "dtype", [F32, pytest.param(BF16, marks=pytest.mark.slow)], ids=["f32", "bf16"]
)


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def off_grid(key, shape, size, lo=-1, hi=1):
    """Pixel coordinates in ``[lo, size + hi)`` at least 0.2 from an integer (with shape
    ``shape``): bilinear sampling is not differentiable at pixel centres, where the two paths
    may take different one-sided derivatives, and bf16 rounding must not land a point there."""
    k1, k2 = jax.random.split(key)
    whole = jax.random.randint(k1, shape, lo, size + hi)
    return whole + jax.random.uniform(k2, shape, minval=0.2, maxval=0.8)


def normalized(px, size, align_corners=False):
    """Pixel coordinates to ``grid_sample``'s ``[-1, 1]``."""
    return 2 * px / (size - 1) - 1 if align_corners else (2 * px + 1) / size - 1


# -- C1 bilinear_gather --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, align_corners, padding",
    [
        (F32, False, "zeros"),
        (F32, True, "border"),
        (BF16, True, "zeros"),
        pytest.param(BF16, False, "border", marks=pytest.mark.slow),
    ],
    ids=["f32-edges-zeros", "f32-centres-border", "bf16-centres-zeros", "bf16-edges-border"],
)
def test_bilinear_gather_matches_dense_reference(dtype, align_corners, padding):
    k1, k2 = keys(2)
    x = harness.normal(k1, (2, 5, 7, 3))
    kx, ky = jax.random.split(k2)  # some points outside
    coords = jnp.stack(
        [
            normalized(off_grid(kx, (2, 4, 3), 7), 7, align_corners),
            normalized(off_grid(ky, (2, 4, 3), 5), 5, align_corners),
        ],
        -1,
    )
    op = lambda impl: (
        lambda x, c: ops.bilinear_gather(
            x, c, align_corners=align_corners, padding=padding, implementation=impl
        )
    )
    harness.check_vjp(op("xla"), op("reference"), (x, coords), dtype, what=f"{padding} {align_corners}")


def test_bilinear_gather_known_answers():
    x = jnp.arange(12.0).reshape(1, 3, 4, 1)
    # pixel centres return the pixel; midpoints the mean of the neighbours
    pts = jnp.array([[[2.0, 1.0], [0.5, 0.0], [3.0, 2.0], [1.5, 1.5]]])
    out = ops.bilinear_gather(x, pts, normalized=False)[0, :, 0]
    np.testing.assert_allclose(out, [6.0, 0.5, 11.0, (5 + 6 + 9 + 10) / 4], rtol=1e-6)
    # align_corners=True maps -1 / 1 to the corner pixels' centres, False to their outer edges
    corners = jnp.array([[[-1.0, -1.0], [1.0, 1.0]]])
    np.testing.assert_allclose(ops.bilinear_gather(x, corners, align_corners=True)[0, :, 0], [0.0, 11.0])
    np.testing.assert_allclose(ops.bilinear_gather(x, corners)[0, :, 0], [0.0, 11.0 / 4], rtol=1e-6)
    np.testing.assert_allclose(ops.bilinear_gather(x, corners, padding="border")[0, :, 0], [0.0, 11.0])
    # far outside: zeros, or the border pixel
    far = jnp.array([[[10.0, 0.0]]])
    assert float(ops.bilinear_gather(x, far, normalized=False)[0, 0, 0]) == 0.0
    assert float(ops.bilinear_gather(x, far, normalized=False, padding="border")[0, 0, 0]) == 3.0


def test_bilinear_gather_coordinate_gradient_is_the_slope():
    x = jnp.arange(12.0).reshape(1, 3, 4, 1)  # value = 4 y + x: slope 1 in x, 4 in y
    g = jax.grad(lambda c: ops.bilinear_gather(x, c, normalized=False).sum())(jnp.array([[[1.3, 0.6]]]))
    np.testing.assert_allclose(g[0, 0], [1.0, 4.0], rtol=1e-6)


def test_bilinear_gather_forward_mode_falls_back_to_the_reference():
    x = harness.normal(jax.random.key(1), (1, 3, 4, 2))
    c = jnp.array([[[0.3, -0.2], [0.7, 0.1]]])
    f = lambda c: ops.bilinear_gather(x, c)
    _, tangent = jax.jvp(f, (c,), (jnp.ones_like(c),))
    np.testing.assert_allclose(tangent, jax.jacrev(f)(c).sum((-1, -2, -3)), rtol=1e-5, atol=1e-6)


def test_bilinear_gather_errors():
    x = jnp.zeros((2, 3, 4, 5))
    with pytest.raises(ValueError, match="coords"):
        ops.bilinear_gather(x, jnp.zeros((2, 6, 3)))
    with pytest.raises(ValueError, match="coords"):
        ops.bilinear_gather(x, jnp.zeros((1, 6, 2)))
    with pytest.raises(ValueError, match="padding"):
        ops.bilinear_gather(x, jnp.zeros((2, 6, 2)), padding="reflect")
    with pytest.raises(ValueError, match="rank"):
        ops.bilinear_gather(x[0], jnp.zeros((3, 6, 2)))


# -- 1.11 multi-scale deformable attention -------------------------------------------------------

SHAPES = [(5, 7), (3, 2)]


def _deform_inputs(B=2, T=5, M=2, K=3, E=4, shapes=SHAPES, seed=0):
    k1, k2, k3 = keys(3, seed)
    N, L = sum(h * w for h, w in shapes), len(shapes)
    values = harness.normal(k1, (B, N, M, E))
    locs = []
    for l, (h, w) in enumerate(shapes):
        kx, ky = jax.random.split(jax.random.fold_in(k2, l))
        px, py = off_grid(kx, (B, T, M, K), w), off_grid(ky, (B, T, M, K), h)
        locs.append(jnp.stack([(px + 0.5) / w, (py + 0.5) / h], -1))
    locations = jnp.stack(locs, 3)  # some points outside the map
    logits = harness.normal(k3, (B, T, M, L, K))
    return values, locations, logits


@DTYPES
def test_deformable_gather_equals_scatter_dense(dtype):
    op = lambda impl: lambda v, loc, a: ops.deformable_attention(v, SHAPES, loc, a, implementation=impl)
    harness.check_vjp(op("xla"), op("reference"), _deform_inputs(), dtype, what="deformable")


def test_deformable_known_answers():
    values, _, _ = _deform_inputs(B=1, M=1, K=1, E=2, shapes=[(5, 7)])
    grid = values.reshape(5, 7, 2)
    # integer-aligned locations (pixel centres) return exact pixel values; one point per query
    rows, cols = jnp.array([0, 4, 2]), jnp.array([6, 0, 3])
    loc = jnp.stack([(cols + 0.5) / 7, (rows + 0.5) / 5], -1).reshape(1, 3, 1, 1, 1, 2)
    for impl in ("xla", "reference"):
        out = ops.deformable_attention(values, [(5, 7)], loc, jnp.zeros((1, 3, 1, 1, 1)), implementation=impl)
        np.testing.assert_allclose(out[0, :, 0], grid[rows, cols], rtol=1e-6, atol=1e-6)
    # equal logits over L K points average the samples
    values, loc, _ = _deform_inputs(B=1, T=2, M=1, K=2, E=3)
    out = ops.deformable_attention(values, SHAPES, loc, jnp.zeros(loc.shape[:-1]))
    one_hot = lambda i: jnp.broadcast_to(
        jnp.where(jnp.arange(4).reshape(1, 1, 1, 2, 2) == i, 0.0, -1e9), loc.shape[:-1]
    )
    samples = [ops.deformable_attention(values, SHAPES, loc, one_hot(i)) for i in range(4)]
    np.testing.assert_allclose(out, sum(samples) / 4, rtol=1e-5, atol=1e-6)


def test_deformable_errors():
    values, loc, logits = _deform_inputs()
    with pytest.raises(ValueError, match="pixels"):
        ops.deformable_attention(values, [(5, 7)], loc, logits)
    with pytest.raises(ValueError, match="locations"):
        ops.deformable_attention(values, SHAPES, loc[..., :1], logits)
    with pytest.raises(ValueError, match="logits"):
        ops.deformable_attention(values, SHAPES, loc, logits[..., :2])
    with pytest.raises(ValueError, match="shapes"):
        ops.deformable_attention(values, [], loc, logits)
