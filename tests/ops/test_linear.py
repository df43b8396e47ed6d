"""Linear attention: the O(T) and causal chunked forms against the dense weights of the papers.

``LinearSuite`` compares an implementation with ``implementation="reference"`` (the ``[T, S]``
weight matrix, normalized as each paper writes it) for values and q/k/v gradients; ``TestXla``
runs every feature map and normalization, ``TestPallas`` the causal ones (its kernel is the
lightning kernel, interpret mode on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import features, ops
from tests import harness

PROJECTION = features.random_projection(jax.random.key(42), 12, 24)
PRF = functools.partial(features.positive_random_features, projection=PROJECTION)

# Relative RMSE bounds (accumulation orders differ from the dense reference), as for lightning.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 5e-3}

# (feature_map, normalize): every named map with its own normalization, plus mixes.
CASES = {
    "identity-none": ("identity", False),
    "elu1": ("elu1", True),
    "relu": ("relu", True),
    "softmax": ("softmax", True),
    "inline": ("inline", True),
    "mala": ("mala", True),
    "random": (PRF, True),
    "elu1-inline": ("elu1", "inline"),
    "elu1-mala": ("elu1", "mala"),
    "pair": ((features.elu1, features.relu), True),
}


def _qkv(B, T, S, H, K, D=12, E=20, dtype=jnp.float32, scale=0.5):
    return harness.Shape(B=B, T=T, S=S, H=H, K=K, D=D, E=E).qkv(jax.random.key(0), dtype, scale)


class LinearSuite:
    implementation = "xla"
    causal_only = False

    def check(self, case, is_causal, B=2, T=63, S=63, H=4, K=2, dtype=jnp.float32, floor=0.0):
        feature_map, normalize = CASES[case]
        if not is_causal and self.causal_only:
            pytest.skip(f"{self.implementation} serves causal linear attention only")
        if is_causal and case == "softmax":
            pytest.skip("Efficient Attention's key map is not causal")
        run = lambda impl: lambda q, k, v: (ops.linear_attention(
            q, k, v, feature_map=feature_map, normalize=normalize, is_causal=is_causal, implementation=impl),)
        harness.check_vjp(run(self.implementation), run("reference"), _qkv(B, T, S, H, K), dtype, what=case,
                          key=jax.random.key(11), err=functools.partial(harness.rel_rmse, floor=floor),
                          tol=TOL[jnp.dtype(dtype).type])

    @pytest.mark.parametrize("case", list(CASES))
    def test_causal(self, case):
        self.check(case, True)

    @pytest.mark.parametrize("case", list(CASES))
    def test_noncausal_cross(self, case):
        self.check(case, False, T=63, S=100)

    @pytest.mark.parametrize("T", [1, 500])
    def test_lengths(self, T):
        # At T = 1 the one query sees only its own key, so o = v whatever q and k: dq and dk are
        # analytically zero and both sides compute rounding noise (1e-7). Compare them against the
        # scale a gradient has here when it is not zero (unit inputs and cotangent: O(1)).
        self.check("elu1", True, B=1, T=T, S=T, H=2, K=2, floor=1.0 if T == 1 else 0.0)

    def test_bf16(self):
        self.check("mala", True, dtype=jnp.bfloat16)


class TestXla(LinearSuite):
    implementation = "xla"


class TestPallas(LinearSuite):
    implementation = "pallas"
    causal_only = True

    def test_noncausal_falls_back(self):
        q, k, v = _qkv(1, 8, 8, 2, 2)
        with pytest.raises(NotImplementedError, match="non-causal"):
            ops.linear_attention(q, k, v, implementation="pallas")
        np.testing.assert_allclose(ops.linear_attention(q, k, v, implementation=("pallas", "xla")),
                                   ops.linear_attention(q, k, v, implementation="xla"))


# -- properties of the maps and normalizations ------------------------------------------------------


@pytest.mark.parametrize("normalize", ["standard", "inline", "mala"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_weights_sum_to_one(normalize, is_causal):
    """Each of these normalizations makes the weights of a row sum to one: constant values pass.

    The tolerance is the computation's conditioning, not one machine's rounding: with ``v = 1``,
    inline and MALA reach 1 by cancelling terms as large as ``d_i = phi(q_i) . sum_j phi(k_j)``
    (computed here in float64): each a float32 sum of ``N_i`` products (relative error up to
    ``N_i * eps`` in any order of summation, vector width or ISA), combined by a few more roundings
    of that size, so a row may be off by ``c (N_i + 2) eps (1 + d_i)``; ``c = 4`` leaves room for
    every order (the worst row here uses 5% of it)."""
    q, k, _ = _qkv(1, 30, 30, 2, 2)
    v = jnp.ones((1, 30, 2, 3))
    out = ops.linear_attention(q, k, v, feature_map="elu1", normalize=normalize, is_causal=is_causal)
    elu1 = lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    phi_q, phi_k = elu1(np.asarray(q, np.float64)), elu1(np.asarray(k, np.float64))
    ksum = np.cumsum(phi_k, axis=1) if is_causal else phi_k.sum(1, keepdims=True)  # [1, T | 1, H, D]
    den = (phi_q * ksum).sum(-1)  # [1, T, H]
    count = np.arange(1, 31)[None, :, None] if is_causal else 30
    bound = 4 * (count + 2) * np.finfo(np.float32).eps * (1.0 + den)
    err = np.abs(np.asarray(out, np.float64) - 1.0).max(-1)
    assert (err <= bound).all(), f"max error / bound {float((err / bound).max()):.3g}"


def test_mala_keeps_query_magnitude():
    q, k, v = _qkv(1, 20, 20, 2, 2)
    run = lambda q, normalize: ops.linear_attention(q, k, v, feature_map=features.relu, normalize=normalize)
    # relu is positively homogeneous, so standard normalization is blind to |q|; MALA is not.
    np.testing.assert_allclose(run(3 * q, "standard"), run(q, "standard"), rtol=1e-5, atol=1e-6)
    assert np.abs(run(3 * q, "mala") - run(q, "mala")).max() > 1e-2


def test_random_features_approximate_softmax():
    D = 8
    q, k, v = _qkv(1, 40, 40, 2, 2, D=D, E=8, scale=0.3)
    w = features.random_projection(jax.random.key(3), D, 2048)
    prf = functools.partial(features.positive_random_features, projection=w)
    s = D**-0.25  # phi(q s) . phi(k s) ~ exp(q.k / sqrt(D))
    out = jax.jit(lambda q, k, v: ops.linear_attention(q * s, k * s, v, feature_map=prf))(q, k, v)
    ref = jax.jit(lambda q, k, v: ops.attention(q, k, v, implementation="reference"))(q, k, v)
    assert harness.rel_rmse(out, ref) < 0.05


def test_causal_elu1_is_lightning_without_decay():
    q, k, v = _qkv(1, 50, 50, 2, 2)
    num = ops.lightning_attention(features.elu1(q), features.elu1(k), v, scale=1.0)
    out = ops.linear_attention(q, k, v, is_causal=True, normalize=False)
    np.testing.assert_allclose(out, num, rtol=1e-5, atol=1e-5)


def test_feature_map_shapes_and_positivity():
    x = harness.normal(jax.random.key(1), (2, 7, 3, 5))
    for name in ("elu1", "relu", "mala"):
        assert (np.asarray(getattr(features, name)(x)) >= 0).all()
    np.testing.assert_allclose(features.softmax_features(x).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(features.softmax_sequence(x).sum(1), 1.0, rtol=1e-5)
    assert features.positive_random_features(x, key=jax.random.key(0), num_features=16).shape == (2, 7, 3, 16)
    with pytest.raises(ValueError, match="projection or a key"):
        features.positive_random_features(x)


@pytest.mark.parametrize("name", ["feature_map", "feature_map_type", "normalize", "causal_softmax",
                                  "causal_lengths", "k_dim", "heads"])
def test_bad_inputs(name):
    q, k, v = _qkv(1, 8, 10, 4, 2)
    call = functools.partial(ops.linear_attention, q, k, v)
    error, match, fn = {
        "feature_map": (ValueError, "feature_map must be one of", lambda: call(feature_map="cosine")),
        "feature_map_type": (TypeError, "feature_map must be a name", lambda: call(feature_map=3)),
        "normalize": (ValueError, "normalize must be", lambda: call(normalize="softmax")),
        "causal_softmax": (ValueError, "cannot be causal", lambda: ops.linear_attention(q, q, q, feature_map="softmax", is_causal=True)),
        "causal_lengths": (ValueError, "is_causal needs kv_len == q_len", lambda: call(is_causal=True)),
        "k_dim": (ValueError, "k has shape", lambda: ops.linear_attention(q, k[..., :3], v)),
        "heads": (ValueError, "must divide", lambda: ops.linear_attention(q[:, :, :3], k, v)),
    }[name]
    with pytest.raises(error, match=match):
        fn()
