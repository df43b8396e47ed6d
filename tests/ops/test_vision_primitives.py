"""Zoo part 1 primitives C4 and C7: channel-as-token attention and the 2-D relative / separable
bias score mods, against dense einsum / dense-bias references (values and gradients) and their
known answers. (Split from test_vision_zoo.py to keep each file fast.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import ops, score_mods
from tests import harness

F32, BF16 = jnp.float32, jnp.bfloat16
# bf16 of each path runs in the slow tier
DTYPES = pytest.mark.parametrize(
    "dtype", [F32, pytest.param(BF16, marks=pytest.mark.slow)], ids=["f32", "bf16"]
)


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


# -- C4 channel attention ------------------------------------------------------------------------


@DTYPES
def test_channel_attention_matches_einsum(dtype):
    q, k, v = (harness.normal(kk, (2, 13, 12)) for kk in keys(3))

    def ref(q, k, v, groups=3, scale=0.2):
        t = lambda x: x.reshape(2, 13, groups, 12 // groups)
        a = jax.nn.softmax(scale * jnp.einsum("bngi,bngj->bgij", t(q), t(k), precision="highest"), -1)
        return jnp.einsum("bgij,bngj->bngi", a, t(v), precision="highest").reshape(2, 13, 12)

    op = lambda q, k, v: ops.channel_attention(q, k, v, groups=3, scale=0.2, implementation="xla")
    harness.check_vjp(op, ref, (q, k, v), dtype)


def test_channel_attention_is_equivariant_to_position_permutations():
    q, k, v = (harness.normal(kk, (1, 11, 8)) for kk in keys(3))
    perm = jax.random.permutation(jax.random.key(5), 11)
    out = ops.channel_attention(q, k, v, groups=2)
    out_p = ops.channel_attention(q[:, perm], k[:, perm], v[:, perm], groups=2)
    np.testing.assert_allclose(out_p, out[:, perm], rtol=1e-5, atol=1e-6)


def test_channel_attention_errors():
    x = jnp.zeros((1, 4, 6))
    with pytest.raises(ValueError, match="groups"):
        ops.channel_attention(x, x, x, groups=4)
    with pytest.raises(ValueError, match="shape"):
        ops.channel_attention(x, x[:, :3], x)


# -- C7 2-D relative and separable biases ---------------------------------------------------------


def test_relative_bias_2d_is_a_dense_offset_bias():
    a, b, H = 3, 4, 2
    table = harness.normal(jax.random.key(1), (H, 2 * a - 1, 2 * b - 1))
    q, k, v = (harness.normal(kk, (1, a * b, H, 5)) for kk in keys(3))
    yy, xx = np.divmod(np.arange(a * b), b)
    dense = table[:, (yy[None] - yy[:, None]) + a - 1, (xx[None] - xx[:, None]) + b - 1]  # [H, T, S]

    def check(impl):
        f = lambda q, k, v, t: ops.attention(
            q, k, v, score_mod=score_mods.relative_bias_2d(t, (a, b)), implementation=impl
        )
        ref = lambda q, k, v, t: ops.attention(
            q,
            k,
            v,
            bias=t[:, (yy[None] - yy[:, None]) + a - 1, (xx[None] - xx[:, None]) + b - 1][None],
            implementation="reference",
        )
        harness.check_vjp(f, ref, (q, k, v, table), F32, what=impl)

    check("xla")
    check("reference")
    assert dense.shape == (H, a * b, a * b)
    with pytest.raises(ValueError, match="table"):
        score_mods.relative_bias_2d(table, (a, b + 1))


def test_separable_bias_equals_dense_bias():
    Bn, T, H, R, W = 2, 3, 2, 4, 5
    row = harness.normal(jax.random.key(1), (Bn, T, R, H))
    col = harness.normal(jax.random.key(2), (1, T, W, H))
    q = harness.normal(jax.random.key(3), (Bn, T, H, 6))
    k, v = (harness.normal(kk, (Bn, R * W, H, 6)) for kk in keys(2, 4))
    dense = lambda r, c: (
        (r[:, :, :, None, :] + c[:, :, None, :, :]).reshape(-1, T, R * W, H).transpose(0, 3, 1, 2)
    )
    f = lambda q, k, v, r, c: ops.attention(
        q, k, v, score_mod=score_mods.separable_bias(r, c, W), implementation="xla"
    )
    ref = lambda q, k, v, r, c: ops.attention(q, k, v, bias=dense(r, c), implementation="reference")
    harness.check_vjp(f, ref, (q, k, v, row, col), F32)
    with pytest.raises(ValueError, match="width"):
        score_mods.separable_bias(row, col, W + 1)
