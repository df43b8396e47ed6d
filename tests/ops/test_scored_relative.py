"""Relative-logit score variants (issue 22): MVPA's band-limited content with time- and
channel-relative per-query tables, and the adaptive-filter attention; blockwise against the dense
reference (values and gradients, f32 and bf16, odd sizes, GQA) plus the papers' known answers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, ops
from tests import harness

SMALL = {"block_sizes": ops.BlockSizes(block_q=8, block_k=8)}


def _x(key, *shape):
    return harness.normal(jax.random.key(key), shape)


# -- 3.9 MVPA ---------------------------------------------------------------------------------------


def _mvpa_args(T=5, C=3, H=4, K=2, D=6, E=5, nt=4, nc=3):
    N = T * C
    return (_x(0, 2, N, H, D), _x(1, 2, N, K, D), _x(2, 2, N, K, E), _x(3, 2, N, H, nt), _x(4, 2, N, H, nc))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_mvpa_blockwise_equals_dense(dtype):
    fn = lambda impl: (
        lambda *a: ops.mvpa_attention(
            *a, num_channels=3, band=1, implementation=impl, **(SMALL if impl == "xla" else {})
        )
    )
    harness.check_vjp(fn("xla"), fn("reference"), _mvpa_args(), dtype, what="mvpa")


def test_mvpa_known_answers():
    """Zero tables and a band covering every step: causal block attention over time. And one
    query written out by hand in numpy."""
    q, k, v, rt, rc = _mvpa_args()
    got = ops.mvpa_attention(q, k, v, 0 * rt, 0 * rc, num_channels=3, band=5, **SMALL)
    want = ops.attention(q, k, v, mask=masks.causal() | masks.chunked(3), implementation="reference")
    harness.assert_close(got, want, 1e-5, "no tables, no band")
    # query i = 7 (t = 2, c = 1), head 3 (key head 1), band 0: content only from time step 2
    a = [np.asarray(x, np.float64) for x in (q, k, v, rt, rc)]
    i, h, C = 7, 3, 3
    ell = []
    for j in range(9):  # keys of steps 0..2
        content = a[0][0, i, h] @ a[1][0, j, 1] if j // C == 2 else 0.0
        ell.append((content + a[3][0, i, h, 2 - j // C] + a[4][0, i, h, abs(1 - j % C)]) / np.sqrt(6))
    w = np.exp(np.array(ell) - max(ell))
    want = (w / w.sum()) @ a[2][0, :9, 1]
    got = ops.mvpa_attention(q, k, v, rt, rc, num_channels=3, band=0, **SMALL)
    np.testing.assert_allclose(got[0, i, h], want, rtol=1e-5, atol=1e-6)


def test_mvpa_validation():
    q, k, v, rt, rc = _mvpa_args()
    with pytest.raises(ValueError, match="num_channels=4 must divide"):
        ops.mvpa_attention(q, k, v, rt, rc, num_channels=4)
    with pytest.raises(ValueError, match="channel_table must have shape"):
        ops.mvpa_attention(q, k, v, rt, rc[:, :, :2], num_channels=3)
