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


# -- 3.6 adaptive filter attention ------------------------------------------------------------------


def _afa_params(H=4, P=3):
    return {
        "frequency": 0.4 * _x(5, H, P),
        "decay": jnp.array([0.0, 0.1, 0.3, 0.05])[:H],
        "sigma_process": jnp.array([0.5, 0.2, 1.0, 0.0])[:H],
        "sigma_measure": jnp.array([1.0, 0.5, 2.0, 1.0])[:H],
    }


@pytest.mark.parametrize(
    "causal,dtype", [(True, jnp.float32), (False, jnp.bfloat16)], ids=["causal-f32", "full-bf16"]
)
def test_afa_blockwise_equals_dense(causal, dtype):
    args = (_x(0, 2, 11, 4, 6), _x(1, 2, 11, 2, 6), _x(2, 2, 11, 2, 6), _afa_params())
    fn = lambda impl: (
        lambda q, k, v, p: ops.adaptive_filter_attention(q, k, v, **p, is_causal=causal, implementation=impl)
    )
    harness.check_vjp(fn("xla"), fn("reference"), args, dtype, what="afa")


def test_afa_known_answers():
    """Zero decay and process noise (sigma_R = 1): rotary attention with values in the rotating
    frame. With no content (q = 0) the weights depend on the lag only, through P."""
    from attnjax.ops.scored.afa import log_precision, rotate

    q, k, v = _x(0, 1, 9, 2, 4), _x(1, 1, 9, 2, 4), _x(2, 1, 9, 2, 4)
    omega = 0.3 * _x(5, 2, 2)
    zero = {
        "frequency": omega,
        "decay": jnp.zeros(2),
        "sigma_process": jnp.zeros(2),
        "sigma_measure": jnp.ones(2),
    }
    ang = jnp.arange(9.0)[:, None, None] * omega[None]
    rope_attn = ops.attention(
        rotate(q, -ang), rotate(k, -ang), rotate(v, -ang), mask=masks.causal(), implementation="reference"
    )
    harness.assert_close(
        ops.adaptive_filter_attention(q, k, v, **zero), rotate(rope_attn, ang), 1e-5, "zero limit"
    )
    p = {
        "frequency": 0 * omega,
        "decay": jnp.array([0.2, 0.0]),
        "sigma_process": jnp.array([0.7, 0.3]),
        "sigma_measure": jnp.array([1.0, 2.0]),
    }
    got = ops.adaptive_filter_attention(0 * q, k, v, **p)
    d = jnp.arange(9.0)[:, None] - jnp.arange(9.0)[None]
    for h in range(2):
        logp = jnp.where(
            d >= 0,
            log_precision(jnp.abs(d), p["decay"][h], p["sigma_process"][h], p["sigma_measure"][h]),
            -jnp.inf,
        )
        w = jax.nn.softmax(logp, -1) * jnp.exp(-p["decay"][h] * jnp.abs(d))
        harness.assert_close(got[0, :, h], w @ v[0, :, h], 1e-5, f"lag-only head {h}")
    with pytest.raises(ValueError, match="even head dim"):
        ops.adaptive_filter_attention(*(_x(i, 1, 5, 2, 3) for i in range(3)), **_afa_params(2, 1))
    with pytest.raises(ValueError, match="frequency must have shape"):
        ops.adaptive_filter_attention(q, k, v, **{**zero, "frequency": jnp.zeros((2, 3))})
