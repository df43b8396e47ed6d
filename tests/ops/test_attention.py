"""``ops.attention``: the shared suite (``tests/suites.py``) on the xla path, plus the xla path's
memory, dispatch and dropout."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, ops, score_mods
from tests import harness
from tests.harness import Shape
from tests.suites import AWKWARD, AttentionSuite, check_poison_causal, check_poison_padding


class TestXla(AttentionSuite):
    implementation = "xla"


def test_xla_memory_is_linear_in_length():
    """No intermediate of the xla path's forward or backward has T * S elements."""
    T = S = 2048
    shape = Shape(B=1, T=T, S=S, H=1, K=1, D=16, E=16)
    q, k, v = shape.qkv(jax.random.key(0))
    f = lambda q, k, v: ops.attention(q, k, v, mask=masks.causal(), implementation="xla",
                                      block_sizes=ops.BlockSizes(256, 256)).sum()
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(var.aval.shape))
            for sub in _subjaxprs(eqn):
                yield from sizes(sub)

    biggest = max(sizes(jaxpr.jaxpr))
    assert biggest < T * S // 8, f"an intermediate has {biggest} elements (T*S = {T * S})"

    ref_jaxpr = jax.make_jaxpr(jax.grad(lambda q, k, v: ops.attention(
        q, k, v, mask=masks.causal(), implementation="reference").sum(), argnums=(0, 1, 2)))(q, k, v)
    assert max(sizes(ref_jaxpr.jaxpr)) >= T * S  # the check does see a dense matrix when there is one


def _subjaxprs(eqn):
    """The jaxprs nested in an equation's parameters (loop bodies, branches, custom rules)."""
    for param in eqn.params.values():
        for p in param if isinstance(param, (tuple, list)) else (param,):
            if hasattr(p, "eqns"):
                yield p
            elif hasattr(getattr(p, "jaxpr", None), "eqns"):
                yield p.jaxpr


def test_implementation_sequence_falls_back():
    """The Pallas kernel takes no dense bias: ("pallas", "xla") serves it with xla."""
    q, k, v = Shape(T=8, S=8).qkv(jax.random.key(0))
    bias = jnp.ones((1, 1, 8, 8))
    with pytest.raises(NotImplementedError, match="pallas: the Pallas flash kernel takes no dense bias"):
        ops.attention(q, k, v, bias=bias, implementation="pallas")
    out = ops.attention(q, k, v, bias=bias, implementation=("pallas", "xla"))
    harness.assert_close(out, ops.attention(q, k, v, bias=bias, implementation="reference"), 1e-5)


def test_fallback_serves_parameter_gradients():
    """Learnable ALiBi slopes through ("pallas", "xla"): the kernel declines, xla differentiates."""
    q, k, v = AWKWARD.qkv(jax.random.key(0))
    loss = lambda impl: lambda p: ops.attention(q, k, v, mask=masks.causal(), implementation=impl,
                                                score_mod=score_mods.alibi(p)).sum()
    slopes = score_mods.alibi_slopes(AWKWARD.H)
    harness.assert_close(jax.grad(loss(("pallas", "xla")))(slopes), jax.grad(loss("reference"))(slopes), 1e-4)


def test_default_implementation_matches_reference():
    q, k, v = AWKWARD.qkv(jax.random.key(0))
    harness.assert_close(ops.attention(q, k, v, mask=masks.causal()),
                         ops.attention(q, k, v, mask=masks.causal(), implementation="reference"), 2e-5)


def test_sigmoid_attention_is_attention_with_sigmoid():
    q, k, v = AWKWARD.qkv(jax.random.key(0))
    a = ops.sigmoid_attention(q, k, v, mask=masks.causal(), sigmoid_bias=-2.0)
    w = jax.nn.sigmoid(jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, 2, axis=2)) / np.sqrt(AWKWARD.D) - 2.0)
    w = w * np.asarray(masks.causal().materialize(AWKWARD.T, AWKWARD.S))
    want = jnp.einsum("bhts,bshe->bthe", w, jnp.repeat(v, 2, axis=2))
    harness.assert_close(a, want, 2e-5)



@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_dropout_matches_reference(impl, normalizer):
    """Every implementation drops the same weights (a hash of key and indices), values and grads."""
    s = AWKWARD
    key = jax.random.key(42)
    kw = dict(mask=masks.causal(), normalizer=normalizer, dropout_rate=0.3, dropout_key=key)
    harness.check_vjp(
        lambda q, k, v: ops.attention(q, k, v, implementation=impl, block_sizes=ops.BlockSizes(16, 32), **kw),
        lambda q, k, v: ops.attention(q, k, v, implementation="reference", **kw),
        s.qkv(jax.random.key(0)), jnp.float32, what=f"dropout {impl}")


def test_dropout_statistics():
    """Keep rate ~ 1 - p, kept weights scaled by 1/(1-p), a new key gives a new pattern; the
    expectation over keys of dropped attention is plain attention."""
    s = Shape(B=1, T=64, S=64, H=2, K=2, D=8, E=8)
    q, k, v = s.qkv(jax.random.key(0))
    v_eye = jnp.broadcast_to(jnp.eye(64)[None, :, None, :], (1, 64, 2, 64))  # output = weights
    w = jax.jit(lambda key: ops.attention(q, k, v_eye, dropout_rate=0.25, dropout_key=key, implementation="xla"))
    w0, w1, plain = w(jax.random.key(1)), w(jax.random.key(2)), ops.attention(q, k, v_eye, implementation="xla")
    kept = np.asarray(w0) != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(np.asarray(w0)[kept], np.asarray(plain)[kept] / 0.75, rtol=1e-5)
    assert (np.asarray(w0) != np.asarray(w1)).mean() > 0.2
    mean = jnp.mean(jax.lax.map(w, jax.random.split(jax.random.key(3), 200)), 0)
    assert float(jnp.abs(mean - plain).max()) < 0.05


def test_dropout_validation():
    q, k, v = Shape(T=8, S=8).qkv(jax.random.key(0))
    with pytest.raises(ValueError, match=r"dropout_rate must be a Python number in \[0, 1\)"):
        ops.attention(q, k, v, dropout_rate=1.0, dropout_key=jax.random.key(0))
    with pytest.raises(ValueError, match="needs dropout_key"):
        ops.attention(q, k, v, dropout_rate=0.1)


class JitVariantsTest(chex.TestCase):
    """The xla path gives the reference's answer traced under ``jax.jit`` and run eagerly."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_xla_matches_reference(self):
        q, k, v = Shape(B=1, T=20, S=33, H=2, K=1, D=8, E=8).qkv(jax.random.key(5))
        mask = masks.sliding_window(6, 2)
        op = self.variant(lambda q, k, v: ops.attention(q, k, v, mask=mask, implementation="xla",
                                                        block_sizes=ops.BlockSizes(8, 16)))
        ref = ops.attention(q, k, v, mask=mask, implementation="reference")
        harness.assert_close(op(q, k, v), ref, harness.tolerance(jnp.float32), "xla vs reference")


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_reference_confines_poison(normalizer):
    """The dense reference keeps non-finite keys/values away from queries masked from them."""
    ref = lambda q, k, v, **kw: ops.attention(q, k, v, implementation="reference", **kw)
    check_poison_causal(ref, normalizer)
    if normalizer == "softmax":
        check_poison_padding(ref)


# -- higher-order autodiff ------------------------------------------------------------------------


@pytest.mark.parametrize("normalizer", ["softmax", pytest.param("sigmoid", marks=pytest.mark.slow)])
def test_grad_of_grad_matches_reference(normalizer):
    """Reverse over reverse on the xla path (its custom backward is itself differentiable), with
    a learnable score-mod parameter, against the reference's plain autodiff."""
    s = Shape(B=1, T=20, S=20, H=2, K=1, D=8, E=8)
    q, k, v = s.qkv(jax.random.key(0))
    mask = masks.causal() & masks.document(jnp.array([[0] * 12 + [1] * 8]))

    def hessian_vector(impl):
        def loss(q, k, v, slopes):
            out = ops.attention(q, k, v, mask=mask, normalizer=normalizer, score_mod=score_mods.alibi(slopes),
                                implementation=impl, block_sizes=ops.BlockSizes(8, 8))
            return jnp.sum(jnp.sin(out) ** 2)

        def grad_norm(q, k, v, slopes):
            return sum(jnp.sum(g**2) for g in jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, slopes))

        return jax.jit(jax.grad(grad_norm, argnums=(0, 1, 2, 3)))

    args = (q, k, v, score_mods.alibi_slopes(2))
    for got, want, name in zip(hessian_vector("xla")(*args), hessian_vector("reference")(*args), "qkva"):
        harness.assert_close(got, want, 1e-4, f"d/d{name} |grad|^2")


def test_forward_mode_names_the_implementation_that_serves_it():
    """jax.jvp: the xla path declines with a message naming the reference, so the default
    implementation falls back to it and gives the reference's tangent."""
    q, k, v = Shape(B=1, T=12, S=12, H=2, K=2, D=8, E=8).qkv(jax.random.key(0))
    f = lambda impl: lambda q: ops.attention(q, k, v, mask=masks.causal(), implementation=impl)
    with pytest.raises(NotImplementedError, match=r"xla: forward-mode autodiff .* implementation='reference' supports it"):
        jax.jit(lambda q: jax.jvp(f("xla"), (q,), (q,)))(q)
    got = jax.jit(lambda q: jax.jvp(f(None), (q,), (q,)))(q)
    want = jax.jvp(f("reference"), (q,), (q,))
    for x, y in zip(got, want):
        harness.assert_close(x, y, 2e-5, "jvp")
