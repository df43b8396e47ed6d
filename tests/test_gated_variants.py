"""Gating, score-transform, structure and linear variants (issue 10, part B): Mega, selective
attention, multi-token attention, MaxViT multi-axis attention and L2ViT.

Each efficient path against its dense reference (values and gradients, awkward sizes, bf16),
equations checked by hand in numpy where the reference is itself a composition, validation, and
each NNX module against its op on its own projections (plus ``nnx.jit`` + ``grad``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks, nn, ops
from tests import harness
from tests.harness import Shape


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
    block = ops.maxvit.block_mask((h, w), (2, 3)).materialize(h * w, h * w)[0, 0]
    grid = ops.maxvit.grid_mask((h, w), (2, 3)).materialize(h * w, h * w)[0, 0]
    same_block = (y[:, None] // 2 == y[None] // 2) & (x[:, None] // 3 == x[None] // 3)
    same_grid = (y[:, None] % 2 == y[None] % 2) & (x[:, None] % 2 == x[None] % 2)  # strides 4/2, 6/3
    np.testing.assert_array_equal(block, same_block)
    np.testing.assert_array_equal(grid, same_grid)
    # Every token sees a window of 6 / a grid of 2 x 3 = 6 tokens.
    assert (np.asarray(block).sum(1) == 6).all() and (np.asarray(grid).sum(1) == 6).all()


# -- Mega: damped EMA and chunked attention -----------------------------------------------------


def _ema_args(B=2, T=37, C=3, N=5, key=jax.random.key(1)):
    kx, kp = jax.random.split(key)
    a, d, b, e = jax.random.uniform(kp, (4, C, N), minval=0.1, maxval=0.9)
    return (harness.normal(kx, (B, T, C)), a, d, b - 0.5, e - 0.5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_ema_fft_matches_recurrence(dtype):
    """FFT convolution vs the step-by-step recurrence, values and gradients of x and all four
    EMA parameters."""
    fn = lambda impl: lambda *a: ops.damped_ema(*a, implementation=impl)
    harness.check_vjp(fn("xla"), fn("reference"), _ema_args(), dtype, what="damped_ema")


def test_ema_kernel_is_the_impulse_response():
    """The recurrence written in numpy, fed a unit impulse, gives ema_kernel."""
    _, a, d, b, e = (np.asarray(p, np.float64) for p in _ema_args(T=9))
    h, ys = np.zeros_like(a), []
    for t in range(9):
        h = a * b * float(t == 0) + (1 - a * d) * h
        ys.append((e * h).sum(-1))
    np.testing.assert_allclose(ops.ema_kernel(a, d, b, e, 9), np.stack(ys, -1), rtol=1e-5, atol=1e-7)


def _mega(chunk, impl):
    return lambda q, k, v: ops.mega_attention(q, k, v, chunk_size=chunk, implementation=impl,
                                              block_sizes=ops.BlockSizes(16, 16))


def test_mega_chunked_matches_dense_and_chunks_by_hand():
    shape = Shape(B=2, T=45, S=45, H=1, K=1, D=12, E=20)
    q, k, v = shape.qkv(jax.random.key(2))
    out, _ = harness.check_vjp(_mega(16, "xla"), _mega(16, "reference"), (q, k, v), jnp.float32, what="mega-chunk")

    @jax.jit
    def chunk_by_chunk(q, k, v):  # causal attention on each chunk alone
        parts = [ops.attention(q[:, lo:lo + 16], k[:, lo:lo + 16], v[:, lo:lo + 16], mask=masks.causal(),
                               implementation="reference") for lo in (0, 16, 32)]
        return jnp.concatenate(parts, axis=1)

    harness.assert_close(out, chunk_by_chunk(q, k, v), 2e-5, "chunk by chunk")


def test_mega_layer_is_its_ops_and_trains():
    # The dense paths keep compilation cheap; the efficient ones are tested against them above.
    m = nn.MegaLayer(8, ema_dim=3, qk_dim=6, v_dim=10, chunk_size=8, implementation="reference", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 19, 8))

    def compare(m, x):
        # The EMA is the op with sigmoid-constrained parameters.
        sig = jax.nn.sigmoid
        ema = ops.damped_ema(x, sig(m.alpha_logit[...]), sig(m.delta_logit[...]), m.beta[...], m.eta[...])
        q, k, v, reset, update, h_x = m.projections(x)
        o = ops.attention(q, k, v, mask=masks.chunked(8) & masks.causal(), implementation="reference")[:, :, 0]
        y = update * jax.nn.silu(h_x + m.h_proj(reset * o)) + (1 - update) * x
        return (m.ema(x), ema), (m(x), y)

    _is_its_op_and_trains(m, x, compare, "MegaLayer")


def _is_its_op_and_trains(model, x, compare, what):
    """``compare(model, x)`` returns pairs (module output, the op on its projections) to match;
    in the same ``nnx.jit`` program the gradient of a loss reaches every parameter, finite."""

    @nnx.jit
    def run(model, x):
        return nnx.grad(lambda mod: jnp.mean(mod(x) ** 2))(model), compare(model, x)

    grads, pairs = run(model, x)
    for i, (got, want) in enumerate(pairs):
        harness.assert_close(got, want, 2e-5, f"{what} [{i}]")
    g = jax.tree.leaves(nnx.state(grads))
    assert g and all(np.isfinite(np.asarray(a)).all() for a in g)
    assert sum(float(jnp.abs(a).sum()) for a in g) > 0


# -- Selective attention --------------------------------------------------------------------------


SEL_SHAPE = Shape(B=2, T=21, S=33, H=4, K=2, D=12, E=8)


def _selective_args(shape=SEL_SHAPE, key=jax.random.key(4)):
    q, k, v = shape.qkv(key)
    kt, kv, ka = jax.random.split(jax.random.key(5), 3)
    tq = jax.random.uniform(kt, (shape.B, shape.T, shape.H), minval=0.3, maxval=2.0)
    tv = jax.random.uniform(kv, (shape.B, shape.S, shape.K), minval=0.0, maxval=1.5)
    alpha = jax.random.uniform(ka, (shape.H,), minval=0.0, maxval=0.5)
    return q, k, v, tq, tv, alpha


def _selective(impl, mask=masks.causal()):
    def fn(q, k, v, tq, tv, alpha):
        return ops.selective_attention(q, k, v, query_temperature=tq, position_scale=alpha, value_temperature=tv,
                                       mask=mask, implementation=impl)
    return fn


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_selective_score_mod_matches_scaled_queries(dtype):
    """The temperature as a score mod in the blockwise path (T != S, GQA) vs queries and values
    scaled explicitly before dense attention; gradients of q, k, v and all three temperatures."""
    # In bf16 the position-scale gradient (a sum over every logit, with cancellation) also sees
    # the rounding of q and k against the unrounded reference: allow 1.5x the usual tolerance.
    harness.check_vjp(_selective("xla"), _selective("reference"), _selective_args(), dtype, what="selective",
                      tol_scale=1.5 if dtype == jnp.bfloat16 else 1.0)


def test_selective_by_hand():
    """One head, no mask: softmax(tau_i (1 + alpha log(i + 1)) q_i.k_j / sqrt(D)) (nu_j v_j)."""
    shape = Shape(B=1, T=5, S=5, H=1, K=1, D=3, E=2)
    q, k, v, tq, tv, alpha = (np.asarray(a, np.float64) for a in _selective_args(shape))
    tau = tq[0, :, 0] * (1 + alpha[0] * np.log(np.arange(1, 6)))
    s = tau[:, None] * (q[0, :, 0] @ k[0, :, 0].T) / np.sqrt(3)
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ (tv[0, :, :1] * v[0, :, 0])
    out = _selective("xla", mask=None)(*(jnp.asarray(a, jnp.float32) for a in (q, k, v, tq, tv, alpha)))
    np.testing.assert_allclose(out[0, :, 0], expected, rtol=1e-5, atol=1e-6)


def test_selective_layer_is_its_op_and_trains():
    m = nn.SelectiveAttention(4, 16, num_kv_heads=2, implementation="reference", rngs=nnx.Rngs(5))
    x = jax.random.normal(jax.random.key(14), (2, 9, 16))
    # Move the temperature maps and position scale off their zero (plain attention) start.
    for lin in (m.query_temperature, m.value_temperature):
        lin.kernel[...] = 0.5 * jax.random.normal(jax.random.key(15), lin.kernel.shape)
    m.position_scale[...] = jnp.array([0.0, 0.1, 0.2, 0.4])

    def compare(m, x):
        tq, tv = m.temperatures(x)
        o = ops.selective_attention(m.query(x), m.key(x), m.value(x), query_temperature=tq,
                                    position_scale=m.position_scale[...], value_temperature=tv, mask=masks.causal())
        return ((m(x), m.out(o)),)

    _is_its_op_and_trains(m, x, compare, "SelectiveAttention")


# -- Multi-token attention ----------------------------------------------------------------------


MTA_SHAPE = Shape(B=2, T=19, S=19, H=4, K=2, D=8, E=12)


def _mta_args(key=jax.random.key(6)):
    q, k, v = MTA_SHAPE.qkv(key)
    kk, km = jax.random.split(jax.random.key(7))
    return q, k, v, 0.5 * jax.random.normal(kk, (4, 3, 4)), jax.random.normal(km, (2, 2, 2))


def _mta(impl, mask=masks.causal()):
    return lambda q, k, v, kernel, mix: ops.multi_token_attention(q, k, v, kernel=kernel, head_mix=mix, mask=mask,
                                                                  implementation=impl)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_multi_token_conv_matches_shifted_sum(dtype):
    """Grouped convolution vs the double sum of shifted logits (3x4 kernel: an even key width
    exercises the asymmetric offsets), causal, GQA, head groups of 2; gradients of the kernel
    and the mixing weights too."""
    harness.check_vjp(_mta("xla"), _mta("reference"), _mta_args(), dtype, what="mta")


def test_multi_token_is_causal_and_reduces_to_attention():
    q, k, v, kernel, mix = _mta_args()
    out = _mta("xla")(q, k, v, kernel, mix)
    # Changing keys and values from position 10 on leaves the first 10 queries unchanged.
    k2, v2 = k.at[:, 10:].add(3.0), v.at[:, 10:].add(3.0)
    out2 = _mta("xla")(q, k2, v2, kernel, mix)
    np.testing.assert_allclose(out[:, :10], out2[:, :10], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out[:, 10:], out2[:, 10:])
    # Identity kernel (1 at query offset 0, key offset 0) and identity mixing: plain attention.
    eye_kernel = jnp.zeros((4, 3, 4)).at[:, 0, 2].set(1.0)
    eye_mix = jnp.broadcast_to(jnp.eye(2), (2, 2, 2))
    plain = ops.attention(q, k, v, mask=masks.causal(), implementation="reference")
    harness.assert_close(_mta("xla")(q, k, v, eye_kernel, eye_mix), plain, 2e-5, "identity mta")


def test_multi_token_layer_is_its_op_and_trains():
    m = nn.MultiTokenAttention(4, 16, kernel=(2, 3), head_group=2, implementation="reference", rngs=nnx.Rngs(4))
    x = jax.random.normal(jax.random.key(11), (2, 9, 16))

    fresh_kernel, fresh_mix = m.kernel[...], m.head_mix[...]
    m.kernel[...] = fresh_kernel + 0.3 * jax.random.normal(jax.random.key(12), fresh_kernel.shape)
    m.head_mix[...] = fresh_mix + 0.3 * jax.random.normal(jax.random.key(13), fresh_mix.shape)

    def compare(m, x):
        q, k, v = m.query(x), m.key(x), m.value(x)
        o = ops.multi_token_attention(q, k, v, kernel=m.kernel[...], head_mix=m.head_mix[...], mask=masks.causal())
        # The initial (identity) kernel and mixing give plain causal attention.
        fresh = ops.multi_token_attention(q, k, v, kernel=fresh_kernel, head_mix=fresh_mix, mask=masks.causal(),
                                          implementation="reference")
        plain = ops.attention(q, k, v, mask=masks.causal(), implementation="reference")
        return (m(x), m.out(m.norm(o))), (fresh, plain)

    _is_its_op_and_trains(m, x, compare, "MultiTokenAttention")


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

    _is_its_op_and_trains(m, x, compare, which)


# -- validation -----------------------------------------------------------------------------------


def _grid(shape=(1, 4, 6, 2, 4)):
    return jnp.ones(shape)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: ops.block_attention(_grid(), _grid(), _grid(), window=4), ValueError, "window=\\(4, 4\\) must divide"),
        (lambda: ops.grid_attention(_grid(), _grid(), _grid(), grid=(3, 2)), ValueError, "grid=\\(3, 2\\) must divide"),
        (lambda: ops.block_attention(_grid(), _grid((1, 4, 3, 2, 4)), _grid(), window=2), ValueError, "k has shape"),
        (lambda: ops.block_attention(_grid()[0], _grid(), _grid(), window=2), ValueError, "q must have rank 5"),
        (lambda: ops.damped_ema(jnp.ones((1, 5, 3)), *(jnp.ones((2, 4)),) * 4), ValueError, "channels, as in x"),
        (lambda: ops.damped_ema(jnp.ones((1, 5, 3)), jnp.ones((3, 4)), jnp.ones((3, 4)), jnp.ones((3, 4)),
                                jnp.ones((3, 2))), ValueError, "share one shape"),
        (lambda: ops.mega_attention(jnp.ones((1, 5, 1, 4)), jnp.ones((1, 6, 1, 4)), jnp.ones((1, 6, 1, 4))),
         ValueError, "length, as in q"),
        (lambda: ops.selective_attention(*(jnp.ones((1, 5, 2, 4)),) * 3, query_temperature=jnp.ones((1, 5, 3))),
         ValueError, "query_temperature must have shape"),
        (lambda: ops.selective_attention(*(jnp.ones((1, 5, 2, 4)),) * 3, query_temperature=jnp.ones((1, 5, 2)),
                                         value_temperature=jnp.ones((1, 5, 1))), ValueError, "value_temperature"),
        (lambda: ops.multi_token_attention(*(jnp.ones((1, 5, 4, 4)),) * 3, kernel=jnp.ones((2, 3, 3))),
         ValueError, "heads, as in q"),
        (lambda: ops.multi_token_attention(*(jnp.ones((1, 5, 4, 4)),) * 3, head_mix=jnp.ones((3, 2, 2))),
         ValueError, "groups \\* c_h = heads = 4"),
        (lambda: nn.MultiAxisAttention(2, 8, window=2, grid=2, rngs=nnx.Rngs(0)), ValueError, "exactly one"),
    ],
    ids=["window", "grid", "k_grid", "rank", "ema_channels", "ema_shapes", "mega_len", "sel_q", "sel_v",
         "mta_kernel", "mta_mix", "module_axes"],
)
def test_validation(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_annotations_are_consistent():
    """Run-time jaxtyping check of every new op's signature on valid calls (dense paths; traced
    by ``jax.eval_shape``, never compiled)."""
    from beartype import beartype
    from jaxtyping import jaxtyped

    def check(fn):
        checked = jaxtyped(typechecker=beartype)(fn)
        return lambda *a, **kw: jax.eval_shape(lambda *a: checked(*a, **kw), *a)

    g = _grid((1, 4, 6, 2, 4))
    check(ops.block_attention)(g, g, g, window=2, implementation="reference")
    check(ops.grid_attention)(g, g, g, grid=2, implementation="reference")
    x, a, d, b, e = _ema_args(B=1, T=6)
    check(ops.damped_ema)(x, a, d, b, e, implementation="reference")
    s = jnp.ones((1, 5, 2, 4))
    check(ops.mega_attention)(s, s, s, chunk_size=2, implementation="reference")
    check(ops.selective_attention)(s, s, s, query_temperature=jnp.ones((1, 5, 2)), position_scale=jnp.ones(2),
                                   value_temperature=jnp.ones((1, 5, 2)), implementation="reference")
    check(ops.multi_token_attention)(s, s, s, kernel=jnp.ones((2, 2, 3)), head_mix=jnp.ones((1, 2, 2)),
                                     implementation="reference")
