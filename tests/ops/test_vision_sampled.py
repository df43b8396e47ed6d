"""Zoo part 1, VSA (varied-size window attention): the gathered, windowed path against the dense
bilinear + dense attention reference (values and gradients, scales and offsets included), and
the known answer that a zero regressor output is window attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import ops, score_mods
from attnjax.ops.vision.vsa import sampling_points
from tests import harness


def inputs(B=2, h=6, w=9, H=2, D=5, E=3, window=3, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    q, k = harness.normal(ks[0], (B, h, w, H, D)), harness.normal(ks[1], (B, h, w, H, D))
    v = harness.normal(ks[2], (B, h, w, H, E))
    n = (B, h // window, w // window, H, 2)
    # away from zero, so no point sits exactly on a pixel centre (where sampling has a kink)
    scales = 0.1 + 0.2 * jax.random.uniform(ks[3], n)
    offsets = 0.05 + 0.3 * jax.random.uniform(ks[4], n)
    table = harness.normal(ks[5], (H, 2 * window - 1, 2 * window - 1))
    return q, k, v, scales, offsets, table


def op(impl):
    return lambda q, k, v, s, o, t: ops.sampled_window_attention(
        q, k, v, s, o, window=3, score_mod=score_mods.relative_bias_2d(t, 3), implementation=impl
    )


@pytest.mark.parametrize(
    "dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)], ids=["f32", "bf16"]
)
def test_vsa_gather_matches_dense_reference(dtype):
    harness.check_vjp(op("xla"), op("reference"), inputs(), dtype)


def test_vsa_known_answers():
    q, k, v, s, o, t = inputs()
    zero = jnp.zeros_like(s)
    mod = score_mods.relative_bias_2d(t, 3)
    got = ops.sampled_window_attention(q, k, v, zero, zero, window=3, score_mod=mod)
    np.testing.assert_allclose(
        got, ops.block_attention(q, k, v, window=3, score_mod=mod), rtol=1e-5, atol=1e-6
    )
    # the sampling points: zero regressor output lands on the window's own pixel centres
    pts = sampling_points(zero[:1, :, :, :1], zero[:1, :, :, :1], (6, 9), (3, 3))
    x = (pts[0, 1, 2, 0, :, :, 0] + 1) * (9 - 1) / 2
    y = (pts[0, 1, 2, 0, :, :, 1] + 1) * (6 - 1) / 2
    np.testing.assert_allclose(x, np.tile(np.arange(6, 9), (3, 1)), atol=1e-5)
    np.testing.assert_allclose(y, np.tile(np.arange(3, 6)[:, None], (1, 3)), atol=1e-5)
    g = jax.grad(lambda s, o: jnp.sum(op("xla")(q, k, v, s, o, t) ** 2), (0, 1))(s, o)
    assert all(np.isfinite(np.asarray(x)).all() and float(jnp.abs(x).sum()) > 0 for x in g)


def test_vsa_errors():
    q, k, v, s, o, _ = inputs()
    with pytest.raises(ValueError, match="no grouped-query"):
        ops.sampled_window_attention(q, k[..., :1, :], v[..., :1, :], s, o, window=3)
    with pytest.raises(ValueError, match="scales"):
        ops.sampled_window_attention(q, k, v, s[:, :1], o, window=3)
    with pytest.raises(ValueError, match="divide"):
        ops.sampled_window_attention(q, k, v, s, o, window=4)


def test_zoo_annotations_are_consistent():
    """Run-time jaxtyping check of the zoo part 1 ops' signatures (traced, never compiled)."""
    from beartype import beartype
    from jaxtyping import jaxtyped

    def check(fn, *a, **kw):
        checked = jaxtyped(typechecker=beartype)(fn)
        return jax.eval_shape(lambda *a: checked(*a, **kw), *a)

    x, z = jnp.ones((2, 6, 9, 2, 4)), jnp.zeros((2, 2, 3, 2, 2))
    f = x.reshape(2, 54, 2, 4)
    check(ops.bilinear_gather, jnp.ones((2, 5, 7, 3)), jnp.zeros((2, 4, 6, 2)))
    check(
        ops.deformable_attention,
        jnp.ones((1, 26, 2, 4)),
        shapes=[(4, 5), (2, 3)],
        locations=jnp.zeros((1, 3, 2, 2, 2, 2)),
        logits=jnp.zeros((1, 3, 2, 2, 2)),
    )
    check(ops.channel_attention, f[..., 0, :], f[..., 0, :], f[..., 0, :], groups=2)
    check(ops.halo_attention, x, x, x, block=3, halo=1)
    check(ops.window_cross_attention, x[:, :3, :3], x, x, window=3)
    check(ops.area_attention, f, f, f, area=3)
    check(ops.sampled_window_attention, x, x, x, z, z, window=3)
    check(ops.varying_window_attention, x, x, x, window=3, ratio=3)
    check(ops.token_aggregation_attention, f, f, f, jnp.zeros((2, 54), jnp.int32), group=5)
    check(ops.attention_diversity_loss, jnp.ones((1, 2, 3, 4)))
