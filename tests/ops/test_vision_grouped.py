"""Zoo part 1: CATANet's token-aggregation attention (sorted groups + centre tokens) and VWA's
varying (context) window attention, each efficient path against its reference (values and
gradients, f32 and bf16, odd sizes) and the spec's known answers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import ops
from tests import harness

F32, BF16 = jnp.float32, jnp.bfloat16


def tokens(B=2, N=23, H=2, K=1, D=5, E=3, M=4, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    q, k, v = (
        harness.normal(ks[0], (B, N, H, D)),
        harness.normal(ks[1], (B, N, K, D)),
        harness.normal(ks[2], (B, N, K, E)),
    )
    a = jax.random.randint(ks[3], (B, N), 0, M)
    return q, k, v, a, harness.normal(ks[4], (1, M, K, D)), harness.normal(ks[5], (1, M, K, E))


@pytest.mark.parametrize("dtype", [F32, pytest.param(BF16, marks=pytest.mark.slow)], ids=["f32", "bf16"])
def test_catanet_groups_match_masked_reference(dtype):
    q, k, v, a, ck, cv = tokens()
    op = lambda impl: (
        lambda q, k, v, ck, cv: ops.token_aggregation_attention(
            q, k, v, a, group=5, center_k=ck, center_v=cv, implementation=impl
        )
    )
    harness.check_vjp(op("xla"), op("reference"), (q, k, v, ck, cv), dtype)


def test_catanet_known_answers():
    q, k, v, a, ck, cv = tokens(B=1, N=12, K=2)
    # by hand: sorted order, groups of 4, keys of groups t and t + 1
    perm = np.argsort(np.asarray(a[0]), kind="stable")
    Q, Kk, V = (np.asarray(x[0], np.float64)[perm] for x in (q, k, v))
    out = np.zeros((12, 2, 3))
    for i in range(12):
        keys = [j for j in range(12) if j // 4 - i // 4 in (0, 1)]
        for h in range(2):
            s = Kk[keys, h] @ Q[i, h] / np.sqrt(5)
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            out[i, h] = p @ V[keys, h]
    got = ops.token_aggregation_attention(q, k, v, a, group=4)
    np.testing.assert_allclose(np.asarray(got[0])[perm], out, rtol=1e-5, atol=1e-6)
    # IRCA: every query sees the same M centre keys (the op adds one attention over them)
    # (the dense reference paths below: cheap to run eagerly; xla == reference is tested above)
    ref = "reference"
    got = ops.token_aggregation_attention(q, k, v, a, group=4, implementation=ref)
    both = ops.token_aggregation_attention(q, k, v, a, group=4, center_k=ck, center_v=cv, implementation=ref)
    centres = ops.attention(
        q, jnp.broadcast_to(ck, (1, 4, 2, 5)), jnp.broadcast_to(cv, (1, 4, 2, 3)), implementation=ref
    )
    np.testing.assert_allclose(both - got, centres, rtol=1e-5, atol=1e-6)
    # one group covering everything is full attention
    np.testing.assert_allclose(
        ops.token_aggregation_attention(q, k, v, a, group=12, implementation=ref),
        ops.attention(q, k, v, implementation=ref),
        rtol=1e-5,
        atol=1e-6,
    )
    x = harness.normal(jax.random.key(9), (1, 6, 3))
    assert ops.cosine_assign(x, 2.0 * x[0, :2]).tolist()[0][:2] == [0, 1]
    with pytest.raises(ValueError, match="assignment"):
        ops.token_aggregation_attention(q, k, v, a[:, :5], group=4)
    with pytest.raises(ValueError, match="together"):
        ops.token_aggregation_attention(q, k, v, a, group=4, center_k=ck)


def grid(B=2, h=6, w=9, H=2, K=1, D=5, E=3, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (
        harness.normal(ks[0], (B, h, w, H, D)),
        harness.normal(ks[1], (B, h, w, K, D)),
        harness.normal(ks[2], (B, h, w, K, E)),
    )


@pytest.mark.parametrize(
    "dtype, ratio, padding",
    [(F32, 3, "replicate"), (F32, 5, "zeros"), pytest.param(BF16, 3, "replicate", marks=pytest.mark.slow)],
    ids=["f32-r3-replicate", "f32-r5-zeros", "bf16-r3-replicate"],
)
def test_vwa_box_filter_matches_unfolded_reference(dtype, ratio, padding):
    op = lambda impl: (
        lambda q, k, v: ops.varying_window_attention(
            q, k, v, window=3, ratio=ratio, padding=padding, implementation=impl
        )
    )
    harness.check_vjp(op("xla"), op("reference"), grid(), dtype)


def test_vwa_known_answers():
    q, k, v = grid()
    np.testing.assert_allclose(
        ops.varying_window_attention(q, k, v, window=3, ratio=1),
        ops.block_attention(q, k, v, window=3),
        rtol=1e-5,
        atol=1e-6,
    )
    const = jnp.full_like(v, 2.5)
    np.testing.assert_allclose(ops.varying_window_attention(q, k, const, window=3, ratio=3), 2.5, rtol=1e-6)
    zeros = ops.varying_window_attention(q, k, const, window=3, ratio=3, padding="zeros")
    assert float(jnp.abs(zeros - 2.5).max()) > 0.1  # zero padding dilutes the border windows
    with pytest.raises(ValueError, match="even"):
        ops.varying_window_attention(q, k, v, window=3, ratio=2)
    with pytest.raises(ValueError, match="padding"):
        ops.varying_window_attention(q, k, v, window=3, ratio=3, padding="reflect")
