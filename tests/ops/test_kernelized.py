"""Linear-time variants (issue 22): Flowformer, fastmax (FAST), LightNet and normalized attention
pooling. Each linear form (causal = chunked lightning) against its dense quadratic reference,
values and gradients in f32 and bf16 at odd sizes with GQA, plus each paper's testable property."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import normalizers, ops
from tests import harness

CASES = pytest.mark.parametrize(
    "causal,dtype", [(True, jnp.float32), (False, jnp.bfloat16)], ids=["causal-f32", "full-bf16"]
)


def _qkv(T=13, S=13, H=4, K=2, D=5, E=3, seed=0, scale=1.0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (
        harness.normal(ks[0], (2, T, H, D), scale=scale),
        harness.normal(ks[1], (2, S, K, D), scale=scale),
        harness.normal(ks[2], (2, S, K, E)),
    )


def _check(op, causal, dtype, what, **kw):
    fn = lambda impl: lambda q, k, v: op(q, k, v, is_causal=causal, implementation=impl, **kw)
    S = 13 if causal else 10  # T != S where allowed
    harness.check_vjp(fn("xla"), fn("reference"), _qkv(S=S), dtype, what=what, err=harness.rel_rmse)


def _future_blind(op, **kw):
    """Changing the last tokens leaves every earlier causal output unchanged."""
    q, k, v = _qkv()
    out = op(q, k, v, is_causal=True, **kw)
    q2, k2, v2 = (x.at[:, 9:].set(x[:, 9:] * -3.0 + 1.0) for x in (q, k, v))
    out2 = op(q2, k2, v2, is_causal=True, **kw)
    np.testing.assert_allclose(out[:, :9], out2[:, :9], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[:, 9:], out2[:, 9:])


# -- 3.1 Flowformer -----------------------------------------------------------------------------


@CASES
def test_flow_attention_linear_equals_dense(causal, dtype):
    _check(ops.flow_attention, causal, dtype, "flow")


def test_flow_attention_is_causal():
    _future_blind(ops.flow_attention)


def test_flow_attention_known_weights():
    """Non-causal, one head: the dense weights a_i phi(q_i).phi(k_j) c_j / I_i written in numpy."""
    q, k, v = (np.asarray(x[:1, :, :1], np.float64) for x in _qkv(T=6, S=8, H=1, K=1))
    fq, fk = 1 / (1 + np.exp(-q[0, :, 0])), 1 / (1 + np.exp(-k[0, :, 0]))
    A = fq @ fk.T
    I, O = A.sum(1), A.sum(0)
    I_hat, O_hat = A @ (1 / O), np.clip(A.T @ (1 / I), -1, 1)
    a = 1 / (1 + np.exp(-I_hat * 6 / 8))
    c = 8 * np.exp(O_hat) / np.exp(O_hat).sum()
    want = (a / I)[:, None] * A * c[None] @ v[0, :, 0]
    got = ops.flow_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(got[0, :, 0], want, rtol=2e-5, atol=1e-6)


# -- 3.2 fastmax ----------------------------------------------------------------------------------


@CASES
def test_fastmax_factorized_equals_dense(causal, dtype):
    _check(ops.fastmax_attention, causal, dtype, "fastmax")


def test_fastmax_p1_and_causality():
    _check(ops.fastmax_attention, True, jnp.float32, "fastmax p=1", p=1)
    _future_blind(ops.fastmax_attention)


def test_fastmax_features_and_positivity():
    """phi(x).phi(y) = 1 + s + s^2/2 and f > 0; normalized scores stay in [-1, 1]."""
    x, y = (harness.normal(jax.random.key(i), (50, 7)) for i in (0, 1))
    s = (x * y).sum(-1)
    got = (ops.fastmax_features(x) * ops.fastmax_features(y)).sum(-1)
    np.testing.assert_allclose(got, 1 + s + s * s / 2, rtol=1e-5, atol=1e-5)
    assert float((1 + s + s * s / 2).min()) > 0
    q, k, _ = _qkv(scale=5.0)
    qn, kn = ops.fastmax_normalize(q), ops.fastmax_normalize(k)
    assert float(jnp.abs(jnp.einsum("bthd,bshd->bhts", qn, kn[:, :, :1].repeat(4, 2))).max()) <= 1 + 1e-5
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        ops.fastmax_attention(q, k, _, p=3)


# -- 3.3 LightNet -----------------------------------------------------------------------------------


@CASES
def test_lightnet_linear_equals_dense(causal, dtype):
    _check(ops.lightnet_attention, causal, dtype, "lightnet")


def test_lightnet_additive_is_multiplicative_with_data_dependent_decay():
    """s_t = lambda_t s_{t-1} + (e^{k_t} / z_t) v_t^T with lambda_t = z_{t-1} / z_t (per channel),
    o_t = q_t^T s_t: the multiplicative recurrence, stepped in numpy, gives the additive op."""
    q, k, v = (np.asarray(x, np.float64) for x in _qkv(H=2, K=2))
    ek = np.exp(k)
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    state = np.zeros(q.shape[:1] + (2, q.shape[-1], v.shape[-1]))  # [B, H, D, E]
    z_prev = np.zeros(q.shape[:1] + (2, q.shape[-1]))
    for t in range(q.shape[1]):
        z = z_prev + ek[:, t]
        lam = z_prev / z
        state = lam[..., None] * state + (ek[:, t] / z)[..., None] * v[:, t, :, None, :]
        out[:, t] = np.einsum("bhd,bhde->bhe", q[:, t], state)
        z_prev = z
    got = ops.lightnet_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(got, out, rtol=1e-4, atol=1e-5)


def test_lightnet_global_form_ignores_key_order():
    q, k, v = _qkv()
    perm = np.random.default_rng(0).permutation(13)
    a = ops.lightnet_attention(q, k, v, is_causal=False)
    b = ops.lightnet_attention(q, k[:, perm], v[:, perm], is_causal=False)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# -- 3.4 normalized attention pooling -----------------------------------------------------------


@CASES
def test_nap_linear_equals_dense(causal, dtype):
    g, b = jnp.array([1.5, 0.5, 1.0, 2.0]), jnp.array([0.1, -0.2, 0.0, 0.3])
    fn = lambda impl: (
        lambda q, k, v, g, b: ops.nap_attention(
            q, k, v, gain=g, shift=b, is_causal=causal, scale=0.5, implementation=impl
        )
    )
    harness.check_vjp(
        fn("xla"),
        fn("reference"),
        (*_qkv(S=13 if causal else 10), g, b),
        dtype,
        what="nap",
        err=harness.rel_rmse,
    )


def test_non_variant_linear_equals_dense():
    _check(ops.nap_attention, True, jnp.float32, "non", variant="non")


def test_standardized_rows_known_answers():
    """Rows satisfy sum_j (a_ij - b) = 0 and sum_j (a_ij - b)^2 = g^2 N_i; a constant added to a
    row of scores changes nothing; the blockwise op declines and falls back to the reference."""
    s = harness.normal(jax.random.key(0), (1, 2, 5, 9))
    allowed = jnp.tril(jnp.ones((5, 9), bool), 4)
    w = normalizers.standardize(jnp.array([2.0, 0.5]), jnp.array([0.3, -1.0])).dense(9, s, allowed)
    n = allowed.sum(-1)
    centred = jnp.where(allowed, w - jnp.array([0.3, -1.0])[:, None, None], 0.0)
    np.testing.assert_allclose(centred.sum(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose((centred**2).sum(-1), (jnp.array([4.0, 0.25])[:, None] * n)[None], rtol=1e-5)
    q, k, v = _qkv(H=2, K=2)
    norm = normalizers.standardize(1.5, 0.2)
    base = ops.attention(q, k, v, normalizer=norm, implementation="reference")
    shifted = ops.attention(
        q, k, v, normalizer=norm, bias=jnp.arange(13.0)[None, None, :, None] * 7.0, implementation="reference"
    )
    np.testing.assert_allclose(base, shifted, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ops.attention(q, k, v, normalizer=norm), base, rtol=1e-6, atol=1e-6)


def test_kernelized_validation():
    q, k, v = _qkv(S=10)
    for op in (ops.flow_attention, ops.fastmax_attention, ops.lightnet_attention, ops.nap_attention):
        with pytest.raises(ValueError, match="is_causal needs kv_len == q_len"):
            op(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match="variant"):
        ops.nap_attention(q, k, v, variant="x")
    with pytest.raises(ValueError, match="per head"):
        ops.nap_attention(q, k, v, gain=jnp.ones(3))


def test_nap_square_sums_chunked_equals_dense():
    """sum_{j <= i} (q_i . k_j)^2 by chunks (ragged last chunk) == the dense sum."""
    from attnjax.ops.kernelized.nap import square_sums

    q, k, _ = _qkv(T=13, S=13, H=2, K=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) ** 2
    for causal in (True, False):
        dense = (
            jnp.where(jnp.tril(jnp.ones((13, 13), bool)) if causal else True, s, 0.0)
            .sum(-1)
            .transpose(0, 2, 1)
        )
        np.testing.assert_allclose(square_sums(q, k, causal, chunk=4), dense, rtol=1e-5, atol=1e-5)
