"""The vision variants (``attnjax/ops/vision``): agent attention (the composed paths against the
dense reference, pooling helpers, validation, and a jaxpr check that the efficient path never
forms a ``[T, S]`` array) and MaxViT's multi-axis block / grid attention, with the MaxViT and
L2ViT modules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks, nn, ops
from tests import harness
from tests.harness import Shape


def _agent_inputs(shape: Shape, n_agents: int, *, biases: bool, key=jax.random.key(0)):
    q, k, v = shape.qkv(key)
    ka, kb, kc = jax.random.split(jax.random.key(3), 3)
    agents = ops.pool_agents_1d(q, n_agents) + 0.1 * jax.random.normal(ka, (shape.B, n_agents, shape.H, shape.D))
    if not biases:
        return (q, k, v, agents)
    agent_bias = harness.normal(kb, (1, shape.H, n_agents, shape.S))
    query_bias = harness.normal(kc, (shape.B, 1, shape.T, n_agents))
    return (q, k, v, agents, agent_bias, query_bias)


def _agent_op(implementation, scale=None):
    def fn(q, k, v, agents, agent_bias=None, query_bias=None):
        return ops.agent_attention(q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias,
                                   scale=scale, implementation=implementation)
    return fn


AGENT_SHAPES = [
    Shape(B=2, T=63, S=100, H=4, K=2, D=12, E=20),  # awkward sizes, GQA, T != S
    Shape(B=1, T=49, S=49, H=2, K=2, D=16, E=16),
]


@pytest.mark.parametrize("shape, biases", [(AGENT_SHAPES[0], True), (AGENT_SHAPES[1], False)], ids=lambda x: str(x))
def test_agent_xla_matches_reference(shape, biases):
    args = _agent_inputs(shape, 7, biases=biases)
    harness.check_vjp(_agent_op("xla"), _agent_op("reference"), args, jnp.float32, what=str(shape))


@pytest.mark.parametrize("dtype", [jnp.bfloat16], ids=["bf16"])
def test_agent_low_precision(dtype):
    shape = AGENT_SHAPES[0]
    harness.check_vjp(_agent_op("xla", scale=0.3), _agent_op("reference", scale=0.3), _agent_inputs(shape, 5, biases=True), dtype)


def test_agent_equations_by_hand():
    """The paper's two softmaxes, written out for one head in numpy."""
    q, k, v, agents = (np.asarray(x, np.float64) for x in _agent_inputs(Shape(B=1, T=5, S=6, H=1, K=1, D=3, E=2), 2, biases=False))
    softmax = lambda s: np.exp(s - s.max(-1, keepdims=True)) / np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)
    Q, K, V, A = q[0, :, 0], k[0, :, 0], v[0, :, 0], agents[0, :, 0]
    scale = 1 / np.sqrt(3)
    expected = softmax(Q @ A.T * scale) @ (softmax(A @ K.T * scale) @ V)
    for impl in ("reference", "xla"):
        out = jax.jit(_agent_op(impl))(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, agents)))
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
def test_agent_validation(change, err, match, implementation):
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
def test_agent_no_t_by_s_array_at_4096(grad):
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


def test_agent_matches_reference_with_49_agents():
    """The 49-agent 2-D configuration at a smaller size (28x28 grid), values and gradients."""
    shape = Shape(B=1, T=28 * 28, S=28 * 28, H=2, K=2, D=16, E=16)
    q, k, v = shape.qkv(jax.random.key(1))
    agents = ops.pool_agents_2d(q, (28, 28), (7, 7))
    harness.check_vjp(_agent_op("xla"), _agent_op("reference"), (q, k, v, agents), jnp.float32, what="49 agents")


@pytest.mark.slow
def test_agent_matches_reference_at_4096():
    shape = Shape(B=1, T=4096, S=4096, H=2, K=2, D=16, E=16)
    q, k, v = shape.qkv(jax.random.key(2))
    agents = ops.pool_agents_2d(q, (64, 64), (7, 7))
    out = jax.jit(_agent_op("xla"))(q, k, v, agents)
    ref = jax.jit(_agent_op("reference"))(q, k, v, agents)
    harness.assert_close(out, ref, harness.tolerance(jnp.float32), "T=S=4096")


def test_agent_jit_and_default_implementation():
    q, k, v, agents = _agent_inputs(AGENT_SHAPES[1], 4, biases=False)
    out = jax.jit(functools.partial(ops.agent_attention))(q, k, v, agents)
    ref = ops.agent_attention(q, k, v, agents, implementation="reference")
    harness.assert_close(out, ref, 1e-5, "jit default")


def _grid_qkv(B, h, w, H, K, D, E, key=jax.random.key(0), dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return (harness.normal(kq, (B, h, w, H, D), dtype), harness.normal(kk, (B, h, w, K, D), dtype),
            harness.normal(kv, (B, h, w, K, E), dtype))


# -- MaxViT: block and grid attention -----------------------------------------------------------


def _multi_axis(axis, size, implementation):
    def fn(q, k, v):
        if axis == "block":
            return ops.block_attention(q, k, v, window=size, implementation=implementation)
        return ops.grid_attention(q, k, v, grid=size, implementation=implementation)
    return fn


@pytest.mark.parametrize(
    "axis, size, dtype",
    [("block", (3, 5), jnp.float32), ("grid", (2, 5), jnp.float32), ("block", 2, jnp.bfloat16)],
    ids=["block-f32", "grid-f32", "block-bf16"],
)
def test_multi_axis_reshape_equals_masked_dense(axis, size, dtype):
    """The windows-as-batch path equals dense attention over the flattened grid with the mask
    (6x10 grid, GQA 2:1, D=12, E=8)."""
    args = _grid_qkv(2, 6, 10, 2, 1, 12, 8)
    harness.check_vjp(_multi_axis(axis, size, "xla"), _multi_axis(axis, size, "reference"), args, dtype,
                      what=f"{axis} {size}")


def test_multi_axis_masks_by_hand():
    h, w = 4, 6
    y, x = np.divmod(np.arange(h * w), w)
    block = masks.block_mask((h, w), (2, 3)).materialize(h * w, h * w)[0, 0]
    grid = masks.grid_mask((h, w), (2, 3)).materialize(h * w, h * w)[0, 0]
    same_block = (y[:, None] // 2 == y[None] // 2) & (x[:, None] // 3 == x[None] // 3)
    same_grid = (y[:, None] % 2 == y[None] % 2) & (x[:, None] % 2 == x[None] % 2)  # strides 4/2, 6/3
    np.testing.assert_array_equal(block, same_block)
    np.testing.assert_array_equal(grid, same_grid)
    # Every token sees a window of 6 / a grid of 2 x 3 = 6 tokens.
    assert (np.asarray(block).sum(1) == 6).all() and (np.asarray(grid).sum(1) == 6).all()


# -- L2ViT and the multi-axis modules -------------------------------------------------------------


@pytest.mark.parametrize("which", ["maxvit", "l2vit"])
def test_vision_blocks_are_their_ops_and_train(which):
    """MaxViTBlock's grid attention and L2ViT's global attention against their ops on their own
    projections; both blocks train. Dense paths keep compilation cheap (the efficient ones'
    gradients are tested above)."""
    kw = dict(mlp_ratio=1.0, implementation="reference", rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(10), (2, 4, 6, 8))
    if which == "maxvit":
        m = nn.MaxViTBlock(2, 8, window=2, grid=(2, 3), **kw)

        def compare(m, x):
            attn = m.grid
            q, k, v = attn.query(x), attn.key(x), attn.value(x)
            return ((attn(x), attn.out(ops.grid_attention(q, k, v, grid=(2, 3)))),)
    else:
        m = nn.L2ViTBlockPair(2, 8, window=2, **kw)

        def compare(m, x):
            attn = m.glob.attn
            q, k, v = attn.query(x), attn.key(x), attn.value(x)
            flat = lambda t: t.reshape(2, 24, 2, 4)
            a = ops.linear_attention(flat(q), flat(k), flat(v), feature_map="relu").reshape(2, 4, 6, 8)
            return ((attn(x), attn.out((a + attn.lcm(a)).reshape(2, 4, 6, 2, 4))),)

    harness.check_module_is_op(m, (x,), compare, what=which, loss=lambda m, x: jnp.mean(m(x) ** 2))


# -- MaxViT validation and annotations -------------------------------------------------------------


def _grid(shape=(1, 4, 6, 2, 4)):
    return jnp.ones(shape)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: ops.block_attention(_grid(), _grid(), _grid(), window=4), ValueError, "window=\\(4, 4\\) must divide"),
        (lambda: ops.grid_attention(_grid(), _grid(), _grid(), grid=(3, 2)), ValueError, "grid=\\(3, 2\\) must divide"),
        (lambda: ops.block_attention(_grid(), _grid((1, 4, 3, 2, 4)), _grid(), window=2), ValueError, "k has shape"),
        (lambda: ops.block_attention(_grid()[0], _grid(), _grid(), window=2), ValueError, "q must have rank 5"),
        (lambda: nn.MultiAxisAttention(2, 8, window=2, grid=2, rngs=nnx.Rngs(0)), ValueError, "exactly one"),
    ],
    ids=["window", "grid", "k_grid", "rank", "module_axes"],
)
def test_multi_axis_validation(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_multi_axis_annotations_are_consistent():
    """Run-time jaxtyping check of block / grid attention's signatures (traced, never compiled)."""
    from beartype import beartype
    from jaxtyping import jaxtyped

    def check(fn):
        checked = jaxtyped(typechecker=beartype)(fn)
        return lambda *a, **kw: jax.eval_shape(lambda *a: checked(*a, **kw), *a)

    g = _grid((1, 4, 6, 2, 4))
    check(ops.block_attention)(g, g, g, window=2, implementation="reference")
    check(ops.grid_attention)(g, g, g, grid=2, implementation="reference")
