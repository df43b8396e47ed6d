"""agent_attention: the composed paths against the dense reference, pooling helpers, validation,
and a jaxpr check that the efficient path never forms a ``[T, S]`` array."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import ops
from tests import harness
from tests.harness import Shape


def _inputs(shape: Shape, n_agents: int, *, biases: bool, key=jax.random.key(0)):
    q, k, v = shape.qkv(key)
    ka, kb, kc = jax.random.split(jax.random.key(3), 3)
    agents = ops.pool_agents_1d(q, n_agents) + 0.1 * jax.random.normal(ka, (shape.B, n_agents, shape.H, shape.D))
    if not biases:
        return (q, k, v, agents)
    agent_bias = harness.normal(kb, (1, shape.H, n_agents, shape.S))
    query_bias = harness.normal(kc, (shape.B, 1, shape.T, n_agents))
    return (q, k, v, agents, agent_bias, query_bias)


def _op(implementation, scale=None):
    def fn(q, k, v, agents, agent_bias=None, query_bias=None):
        return ops.agent_attention(q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias,
                                   scale=scale, implementation=implementation)
    return fn


SHAPES = [
    Shape(B=2, T=63, S=100, H=4, K=2, D=12, E=20),  # awkward sizes, GQA, T != S
    Shape(B=1, T=49, S=49, H=2, K=2, D=16, E=16),
]


@pytest.mark.parametrize("shape, biases", [(SHAPES[0], True), (SHAPES[1], False)], ids=lambda x: str(x))
def test_xla_matches_reference(shape, biases):
    args = _inputs(shape, 7, biases=biases)
    harness.check_vjp(_op("xla"), _op("reference"), args, jnp.float32, what=str(shape))


@pytest.mark.parametrize("dtype", [jnp.bfloat16], ids=["bf16"])
def test_low_precision(dtype):
    shape = SHAPES[0]
    harness.check_vjp(_op("xla", scale=0.3), _op("reference", scale=0.3), _inputs(shape, 5, biases=True), dtype)


def test_equations_by_hand():
    """The paper's two softmaxes, written out for one head in numpy."""
    q, k, v, agents = (np.asarray(x, np.float64) for x in _inputs(Shape(B=1, T=5, S=6, H=1, K=1, D=3, E=2), 2, biases=False))
    softmax = lambda s: np.exp(s - s.max(-1, keepdims=True)) / np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)
    Q, K, V, A = q[0, :, 0], k[0, :, 0], v[0, :, 0], agents[0, :, 0]
    scale = 1 / np.sqrt(3)
    expected = softmax(Q @ A.T * scale) @ (softmax(A @ K.T * scale) @ V)
    for impl in ("reference", "xla"):
        out = jax.jit(_op(impl))(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, agents)))
        np.testing.assert_allclose(np.asarray(out[0, :, 0]), expected, rtol=1e-5, atol=1e-6)


# -- pooling ------------------------------------------------------------------------------------


def test_pool_1d_divisible_is_mean_of_chunks():
    x = jax.random.normal(jax.random.key(0), (2, 12, 3, 4))
    out = ops.pool_agents_1d(x, 4)
    np.testing.assert_allclose(out, x.reshape(2, 4, 3, 3, 4).mean(2), rtol=1e-6, atol=1e-6)


def test_pool_1d_uneven_bins_cover_everything():
    x = jnp.ones((1, 10, 1, 1))
    out = ops.pool_agents_1d(x * jnp.arange(10.0)[None, :, None, None], 3)
    # Bins [0,4), [3,7), [6,10) (adaptive pooling), means 1.5, 4.5, 7.5.
    np.testing.assert_allclose(out[0, :, 0, 0], [1.5, 4.5, 7.5], rtol=1e-6)
    np.testing.assert_allclose(ops.pool_agents_1d(x, 3), jnp.ones((1, 3, 1, 1)), rtol=1e-6)


def test_pool_2d_divisible_is_mean_of_patches():
    x = jax.random.normal(jax.random.key(0), (2, 6 * 8, 2, 3))
    out = ops.pool_agents_2d(x, (6, 8), (3, 2))
    expected = x.reshape(2, 3, 2, 2, 4, 2, 3).mean((2, 4)).reshape(2, 6, 2, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_pool_bf16_keeps_dtype():
    x = jnp.ones((1, 14, 1, 2), jnp.bfloat16)
    assert ops.pool_agents_2d(x, (2, 7), (1, 7)).dtype == jnp.bfloat16
    assert ops.pool_agents_1d(x, 7).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda x: ops.pool_agents_1d(x, 17), ValueError, "num_agents=17 must be <="),
        (lambda x: ops.pool_agents_1d(x, 0), ValueError, "num_agents must be >= 1"),
        (lambda x: ops.pool_agents_2d(x, (4, 5), (2, 2)), ValueError, "grid=\\(4, 5\\) has 20 positions"),
        (lambda x: ops.pool_agents_2d(x, (4, 4), (5, 1)), ValueError, "must not exceed"),
        (lambda x: ops.pool_agents_2d(x, 16, (2, 2)), TypeError, "grid must be a pair"),
        (lambda x: ops.pool_agents_1d(x[0], 2), ValueError, "x must have rank 4"),
    ],
    ids=["too_many", "zero", "grid_size", "agent_grid", "grid_type", "rank"],
)
def test_pool_errors(call, err, match):
    with pytest.raises(err, match=match):
        call(jnp.ones((1, 16, 2, 4)))


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, err, match",
    [
        (dict(agents=jnp.ones((2, 3, 2, 8))), ValueError, "agents has shape .*heads, as in q"),
        (dict(agents=jnp.ones((1, 3, 4, 8))), ValueError, "batch, as in q"),
        (dict(agents=jnp.ones((2, 3, 4, 8), jnp.bfloat16)), TypeError, "agents must have q's dtype"),
        (dict(agents=jnp.ones((2, 0, 4, 8))), ValueError, "at least one agent"),
        (dict(agent_bias=jnp.ones((1, 1, 3, 5))), ValueError, "agent_bias has shape"),
        (dict(query_bias=jnp.ones((1, 1, 3, 3))), ValueError, "query_bias has shape"),
        (dict(k=jnp.ones((2, 9, 3, 8)), v=jnp.ones((2, 9, 3, 8))), ValueError, "k has 3 heads"),
    ],
    ids=["heads", "batch", "dtype", "empty", "agent_bias", "query_bias", "gqa"],
)
@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_validation(change, err, match, implementation):
    args = dict(q=jnp.ones((2, 6, 4, 8)), k=jnp.ones((2, 9, 2, 8)), v=jnp.ones((2, 9, 2, 8)),
                agents=jnp.ones((2, 3, 4, 8)))
    args.update(change)
    extra = {n: args.pop(n) for n in ("agent_bias", "query_bias") if n in args}
    with pytest.raises(err, match=match):
        ops.agent_attention(args["q"], args["k"], args["v"], args["agents"], implementation=implementation, **extra)


# -- memory: no [T, S] intermediate ----------------------------------------------------------------


def _largest_intermediate(jaxpr) -> tuple[int, str]:
    """The largest array any equation (at any nesting depth) of ``jaxpr`` produces."""
    best = (0, "")

    def visit(jx):
        nonlocal best
        for eqn in jx.eqns:
            for var in eqn.outvars:
                shape = getattr(var.aval, "shape", ())
                size = int(np.prod(shape)) if shape else 1
                if size > best[0]:
                    best = (size, f"{eqn.primitive} -> {shape}")
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        visit(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        visit(sub)

    visit(jaxpr.jaxpr)
    return best


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_no_t_by_s_array_at_4096(grad):
    """T = S = 4096 on a 64x64 grid with 7x7 = 49 agents: nothing of T*S elements is formed,
    in the forward pass or in the gradient (traced only, nothing runs)."""
    B, T, H, D = 1, 4096, 2, 16
    spec = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)

    def loss(q, k, v):
        agents = ops.pool_agents_2d(q, (64, 64), (7, 7))
        return ops.agent_attention(q, k, v, agents, implementation="xla").sum()

    fn = jax.grad(loss, argnums=(0, 1, 2)) if grad else loss
    size, where = _largest_intermediate(jax.make_jaxpr(fn)(spec, spec, spec))
    assert size < T * T, f"an intermediate of {size} >= T*S = {T * T} elements: {where}"
    # The reference path, in contrast, is allowed to be dense in [N, S] but we check the test
    # would catch a [T, S] array: plain attention forms one.
    dense = jax.make_jaxpr(lambda q, k, v: ops.attention(q, k, v, implementation="reference"))(spec, spec, spec)
    assert _largest_intermediate(dense)[0] >= T * T


def test_matches_reference_with_49_agents():
    """The 49-agent 2-D configuration at a smaller size (28x28 grid), values and gradients."""
    shape = Shape(B=1, T=28 * 28, S=28 * 28, H=2, K=2, D=16, E=16)
    q, k, v = shape.qkv(jax.random.key(1))
    agents = ops.pool_agents_2d(q, (28, 28), (7, 7))
    harness.check_vjp(_op("xla"), _op("reference"), (q, k, v, agents), jnp.float32, what="49 agents")


@pytest.mark.slow
def test_matches_reference_at_4096():
    shape = Shape(B=1, T=4096, S=4096, H=2, K=2, D=16, E=16)
    q, k, v = shape.qkv(jax.random.key(2))
    agents = ops.pool_agents_2d(q, (64, 64), (7, 7))
    out = jax.jit(_op("xla"))(q, k, v, agents)
    ref = jax.jit(_op("reference"))(q, k, v, agents)
    harness.assert_close(out, ref, harness.tolerance(jnp.float32), "T=S=4096")


def test_jit_and_default_implementation():
    q, k, v, agents = _inputs(SHAPES[1], 4, biases=False)
    out = jax.jit(functools.partial(ops.agent_attention))(q, k, v, agents)
    ref = ops.agent_attention(q, k, v, agents, implementation="reference")
    harness.assert_close(out, ref, 1e-5, "jit default")
