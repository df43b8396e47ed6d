"""Zoo part 2 (issue 21) mechanisms on the primitives: Dynamic Mask Attention, CCA, Hepos, Loki.

Efficient path vs dense reference (values and gradients, f32; bf16 marked slow) on ragged sizes
with GQA, plus each mechanism's known-answer property from ZOO_SPECS.md (2.2, 2.4, 2.10, 2.13).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, ops
from tests import harness
from tests.harness import Shape

S = Shape(B=1, T=21, S=29, H=4, K=2, D=8, E=6)
SELF = Shape(B=1, T=27, S=27, H=4, K=2, D=8, E=6)
DTYPES = pytest.mark.parametrize(
    "dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)], ids=["f32", "bf16"]
)


def _vjp(fn, args, dtype):
    harness.check_vjp(
        functools.partial(fn, implementation="xla"),
        functools.partial(fn, implementation="reference"),
        args,
        dtype,
        what=getattr(fn, "__name__", "op"),
    )


# -- 2.4 Dynamic Mask Attention ------------------------------------------------------------------


@DTYPES
def test_dma_matches_reference(dtype):
    q, k, v = S.qkv(jax.random.key(0))
    # distinct and exact in bfloat16, so both sides select the same keys (the selection is discrete)
    delta = (
        1.0
        + jax.vmap(lambda kk: jax.random.permutation(kk, S.S))(jax.random.split(jax.random.key(1), S.H))[None]
        / 64
    )
    _vjp(
        lambda q, k, v, d, implementation: ops.dma_attention(q, k, v, d, 6, implementation=implementation),
        (q, k, v, delta),
        dtype,
    )


def test_dma_thresholds_and_known_answers():
    d = jax.random.uniform(jax.random.key(2), (2, 3, 45))
    for w in (1, 4, 45):
        t = np.asarray(masks.prefix_thresholds(d, w, block=8))
        for p in (0, 3, 20, 44):
            prefix = np.sort(np.asarray(d)[..., : p + 1], -1)
            want = prefix[..., -w] if p + 1 >= w else np.full(prefix.shape[:-1], -np.inf)
            np.testing.assert_array_equal(t[..., p], want)
    q, k, v = S.qkv(jax.random.key(3))
    delta = jax.random.uniform(jax.random.key(4), (S.B, S.H, S.S))
    # w >= S: attention with key bias delta; with A = 0 the bias is constant: plain causal attention.
    full = ops.dma_attention(q, k, v, delta, S.S)
    want = ops.attention(q, k, v, bias=delta[:, :, None, :], mask=masks.causal(), implementation="reference")
    harness.assert_close(full, want, 2e-5, "w >= S")
    flat = ops.dma_delta(v, jnp.ones((S.K * S.E, S.H)), jnp.zeros(S.H), jnp.zeros(S.H))
    np.testing.assert_array_equal(np.asarray(flat), 1.0)
    harness.assert_close(
        ops.dma_attention(q, k, v, flat, S.S), ops.attention(q, k, v, mask=masks.causal()), 2e-5, "A = 0"
    )
    # the mask keeps exactly w keys per row once the prefix is long enough (distinct scores)
    m = masks.topk_keys(delta, masks.prefix_thresholds(delta, 5)[:, :, S.S - S.T :]) & masks.causal()
    counts = np.asarray(m.materialize(S.T, S.S, batch=S.B, heads=S.H)).sum(-1)
    pos = np.arange(S.T) + S.S - S.T
    np.testing.assert_array_equal(counts, np.broadcast_to(np.minimum(pos + 1, 5), counts.shape))


# -- 2.13 CCA ------------------------------------------------------------------------------------


@DTYPES
@pytest.mark.parametrize("group,window", [(4, 8), (3, 5)])
def test_cca_matches_reference(dtype, group, window):
    _vjp(
        lambda q, k, v, implementation: ops.cca_attention(
            q, k, v, group=group, window=window, implementation=implementation
        ),
        SELF.qkv(jax.random.key(5)),
        dtype,
    )


def test_cca_known_answers():
    q, k, v = SELF.qkv(jax.random.key(6))
    harness.assert_close(
        ops.cca_attention(q, k, v, group=1, window=4), ops.attention(q, k, v, is_causal=True), 2e-5, "g = 1"
    )
    # Every key j <= i counted exactly once (core group or local), formulas of the spec when s % g == 0.
    T, g, s = SELF.T, 4, 8
    n = T // g
    m = np.asarray(ops.sparse.cca.cca_mask(T, g, s).materialize(T, n + T))[0, 0]
    for i in range(T):
        covered = np.zeros(T, int)
        for c in np.flatnonzero(m[i, :n]):
            covered[c * g : (c + 1) * g] += 1
        covered += m[i, n:]
        np.testing.assert_array_equal(covered, (np.arange(T) <= i).astype(int))
        cores = set(np.flatnonzero(m[i, :n]))
        assert cores == {c for c in range(n) if c <= (i - (g - 1) - s) // g}
        assert set(np.flatnonzero(m[i, n:])) == {j for j in range(T) if i - (s + (i + 1) % g) < j <= i}


# -- 2.10 Hepos ----------------------------------------------------------------------------------


@DTYPES
def test_hepos_matches_reference(dtype):
    _vjp(
        lambda q, k, v, implementation: ops.hepos_attention(q, k, v, 3, implementation=implementation),
        S.qkv(jax.random.key(7)),
        dtype,
    )


def test_hepos_known_answers():
    q, k, v = S.qkv(jax.random.key(8))
    harness.assert_close(ops.hepos_attention(q, k, v, 1), ops.attention(q, k, v), 2e-5, "s = 1")
    m = np.asarray(ops.head_stride_mask(4, 4).materialize(2, S.S, heads=4))[0, :, 0]  # [H, S]
    np.testing.assert_array_equal(m.sum(0), 1)  # heads 0..s-1 cover every key exactly once


# -- 2.2 Loki ------------------------------------------------------------------------------------


@DTYPES
def test_loki_matches_reference(dtype):
    q, k, v = S.qkv(jax.random.key(9))
    pca = ops.loki_pca(k)
    _vjp(
        lambda q, k, v, implementation: ops.loki_attention(
            q, k, v, pca, rank=3, top_k=5, implementation=implementation
        ),
        (q, k, v),
        dtype,
    )


def test_loki_known_answers():
    q, k, v = S.qkv(jax.random.key(10))
    out = ops.loki_attention(q, k, v, ops.loki_pca(k), rank=S.D, top_k=S.S)
    harness.assert_close(out, ops.attention(q, k, v, mask=masks.causal()), 2e-5, "d = D, k = S")
    # keys in a rank-2 subspace: rank-2 scores are exact, so the selection is the exact top-k
    basis = jax.random.normal(jax.random.key(11), (S.K, 2, S.D))
    low = jnp.einsum("bskr,krd->bskd", jax.random.normal(jax.random.key(12), (S.B, S.S, S.K, 2)), basis)
    pca = ops.loki_pca(low)
    got = np.sort(np.asarray(ops.loki_indices(q, low, pca, 2, 4)), -1)
    want = np.sort(np.asarray(ops.loki_indices(q, low, pca, S.D, 4)), -1)
    np.testing.assert_array_equal(got, want)


def test_variant_errors():
    q, k, v = S.qkv(jax.random.key(0))
    with pytest.raises(ValueError, match="delta"):
        ops.dma_attention(q, k, v, jnp.ones((S.B, S.K, S.S)), 4)
    with pytest.raises(ValueError, match="kv_len"):
        ops.dma_attention(q, k[:, :5], v[:, :5], jnp.ones((S.B, S.H, 5)), 4)
    with pytest.raises(ValueError, match="length"):
        ops.cca_attention(q, k, v, group=2, window=2)
    with pytest.raises(ValueError, match="rank"):
        ops.loki_attention(q, k, v, ops.loki_pca(k), rank=S.D + 1, top_k=2)
    with pytest.raises(ValueError, match="pca"):
        ops.loki_attention(q, k, v, jnp.zeros((S.K, S.D, 2)), rank=2, top_k=2)
