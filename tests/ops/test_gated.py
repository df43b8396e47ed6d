"""The gated variants (``attnjax/ops/gated``): Mega, selective attention, multi-token attention and
mixture-of-head attention.

Each efficient path against its dense reference (values and gradients, awkward sizes, bf16),
equations checked by hand in numpy where the reference is itself a composition, validation, and
each NNX module against its op on its own projections (plus ``nnx.jit`` + ``grad``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks, nn, ops, score_mods
from attnjax.ops.gated.moh import moh_gates
from tests import harness
from tests.harness import Shape


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


def test_ema_without_memory_at_the_edge_of_the_range():
    """alpha = delta = 1 (damping 1 - alpha delta = 0: each step forgets the past) is in range; the
    FFT kernel's q^0 is 1 there (it was log(0) * 0 = NaN)."""
    x, a, d, b, e = _ema_args(T=9)
    a, d = a.at[0].set(1.0), d.at[0].set(1.0)
    fast, ref = (ops.damped_ema(x, a, d, b, e, implementation=impl) for impl in ("xla", "reference"))
    harness.assert_close(fast, ref, 1e-5, "alpha = delta = 1")


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

    harness.check_module_is_op(m, (x,), compare, what="MegaLayer", loss=lambda m, x: jnp.mean(m(x) ** 2))


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

    harness.check_module_is_op(m, (x,), compare, what="SelectiveAttention", loss=lambda m, x: jnp.mean(m(x) ** 2))


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

    harness.check_module_is_op(m, (x,), compare, what="MultiTokenAttention", loss=lambda m, x: jnp.mean(m(x) ** 2))


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, err, match",
    [
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
        (lambda: ops.damped_ema(jnp.ones((1, 5, 3)), jnp.full((3, 4), 1.5), *(jnp.full((3, 4), 0.5),) * 3),
         ValueError, r"alpha must lie in \(0, 1\].*got \[1.5, 1.5, 1.5, 1.5\] at 12 of 12"),
        (lambda: ops.damped_ema(jnp.ones((1, 5, 3)), jnp.full((3, 4), 0.5), jnp.zeros((3, 4)), *(jnp.ones((3, 4)),) * 2),
         ValueError, r"delta must lie in \(0, 1\]"),
        (lambda: ops.ema_kernel(jnp.full((3, 4), -0.1), *(jnp.full((3, 4), 0.5),) * 3, length=4),
         ValueError, r"alpha must lie in \(0, 1\]"),
    ],
    ids=["ema_channels", "ema_shapes", "mega_len", "sel_q", "sel_v", "mta_kernel", "mta_mix", "ema_alpha",
         "ema_delta", "ema_kernel_alpha"],
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

    x, a, d, b, e = _ema_args(B=1, T=6)
    check(ops.damped_ema)(x, a, d, b, e, implementation="reference")
    s = jnp.ones((1, 5, 2, 4))
    check(ops.mega_attention)(s, s, s, chunk_size=2, implementation="reference")
    check(ops.selective_attention)(s, s, s, query_temperature=jnp.ones((1, 5, 2)), position_scale=jnp.ones(2),
                                   value_temperature=jnp.ones((1, 5, 2)), implementation="reference")
    check(ops.multi_token_attention)(s, s, s, kernel=jnp.ones((2, 2, 3)), head_mix=jnp.ones((1, 2, 2)),
                                     implementation="reference")


# -- Mixture-of-head attention (moh_attention) ---------------------------------------------------


def _moh_logits(B, T, hs, hr, key=jax.random.key(5)):
    k1, k2, k3 = jax.random.split(key, 3)
    return (jax.random.normal(k1, (B, T, hr)), jax.random.normal(k2, (B, T, hs)) if hs else None,
            jax.random.normal(k3, (B, T, 2)) if hs else None)


def test_moh_gates_and_aux_loss_by_hand():
    B, T, hs, hr, top_k = 2, 5, 2, 4, 2
    routed, shared, mix = _moh_logits(B, T, hs, hr)
    gates, aux = moh_gates(routed, top_k, shared, mix, num_shared=hs)
    r, s, m = (np.asarray(x, np.float64) for x in (routed, shared, mix))
    softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
    p, alpha = softmax(r), softmax(m)
    top = np.argsort(-r, axis=-1)[..., :top_k]
    sel = np.zeros_like(r)
    np.put_along_axis(sel, top, 1.0, axis=-1)
    expected = np.concatenate([alpha[..., :1] * softmax(s), alpha[..., 1:] * p * sel], -1)
    np.testing.assert_allclose(gates, expected, rtol=1e-5, atol=1e-7)
    f, P = sel.reshape(-1, hr).mean(0), p.reshape(-1, hr).mean(0)
    np.testing.assert_allclose(aux, (f * P).sum(), rtol=1e-5)
    assert ((np.asarray(gates[..., hs:]) > 0).sum(-1) == top_k).all()


def test_moh_aux_loss_is_top_k_over_hr_when_uniform():
    # Uniform probabilities P_h = 1/4; whatever heads are picked, sum_h f_h = top_k, so the
    # loss is top_k / H_r = 0.5 (its minimum over selections for these probabilities).
    _, aux = moh_gates(jnp.zeros((1, 8, 4)), 2)
    np.testing.assert_allclose(aux, 0.5, rtol=1e-6)


def _moh_qkv(shape: Shape, key=jax.random.key(0)):
    return shape.qkv(key)


MOH_SHAPE = Shape(B=2, T=37, S=37, H=6, K=3, D=8, E=8)  # T not a multiple of the block, GQA


def test_moh_dense_path_is_attention_times_gates():
    q, k, v = _moh_qkv(MOH_SHAPE)
    routed, shared, mix = _moh_logits(2, 37, 2, 4)
    res = jax.jit(functools.partial(ops.moh_attention, top_k=2, mask=masks.causal()))(q, k, v, routed, shared_logits=shared, mix_logits=mix)
    heads = ops.attention(q, k, v, mask=masks.causal(), implementation="reference")
    harness.assert_close(res.out, heads * res.gates[..., None], 1e-5, "dense moh")
    assert res.out.shape == (2, 37, 6, 8) and res.gates.shape == (2, 37, 6) and res.aux_loss.shape == ()


def _moh_mask(kind):
    seg = jnp.sort(jax.random.randint(jax.random.key(9), (2, 37), 0, 3), axis=1)
    return {
        "none": None,
        "causal": masks.causal(),
        "window": masks.sliding_window(5),
        "document_causal": masks.document(seg) & masks.causal(),
        "prefix_lm": masks.prefix_lm(jnp.array([4, 20])),
    }[kind]


@pytest.mark.parametrize(
    "kind", ["causal", "document_causal", *(pytest.param(k, marks=pytest.mark.slow) for k in ("none", "window", "prefix_lm"))]
)
def test_moh_skipping_equals_dense(kind):
    """Values and gradients (q, k, v and the router logits) of the skipping path equal the dense."""
    mask = _moh_mask(kind)
    q, k, v = _moh_qkv(MOH_SHAPE)
    routed, shared, mix = _moh_logits(2, 37, 2, 4)

    def run(skip):
        def f(q, k, v, routed, shared, mix):
            return ops.moh_attention(q, k, v, routed, top_k=1, shared_logits=shared, mix_logits=mix, mask=mask,
                                     skip_unselected=skip, block_q=8).out
        return f

    harness.check_vjp(run(True), run(False), (q, k, v, routed, shared, mix), jnp.float32, what=kind)


def test_moh_skipping_path_sees_global_positions():
    """Score mods and dropout act on global indices in each skipped-to block (ALiBi distances,
    dropped weights), so the skipping path equals the dense one with them too."""
    q, k, v = _moh_qkv(MOH_SHAPE)
    routed, shared, mix = _moh_logits(2, 37, 2, 4)
    kw = dict(top_k=1, shared_logits=shared, mix_logits=mix, mask=masks.causal(), block_q=8,
              score_mod=score_mods.alibi(score_mods.alibi_slopes(MOH_SHAPE.H)), dropout_rate=0.3,
              dropout_key=jax.random.key(4))
    run = lambda skip: lambda q, k, v: ops.moh_attention(q, k, v, routed, skip_unselected=skip, **kw).out
    harness.check_vjp(run(True), run(False), (q, k, v), jnp.float32)


def test_moh_skipping_really_skips():
    """Poison (NaN) the queries of a (batch, block, head) no token selected: the dense path
    multiplies NaN by a zero gate and gives NaN; the skipping path never computes it."""
    B, T, H, D = 1, 16, 3, 4
    q, k, v = Shape(B=B, T=T, S=T, H=H, K=H, D=D, E=D).qkv(jax.random.key(0))
    # No shared heads, 3 routed, top-1; block 0 (tokens 0-7) routes only to head 0.
    routed = jnp.zeros((B, T, H)).at[:, :8, 0].set(5.0).at[:, 8:, 1].set(5.0)
    q = q.at[:, :8, 2].set(jnp.nan)  # head 2 of block 0 is unselected
    kw = dict(top_k=1, block_q=8)
    sparse = ops.moh_attention(q, k, v, routed, skip_unselected=True, **kw).out
    dense = ops.moh_attention(q, k, v, routed, **kw).out
    assert np.isfinite(np.asarray(sparse)).all()
    assert np.isnan(np.asarray(dense)).any()


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(top_k=5), ValueError, "top_k=5 must be <="),
        (dict(top_k=0), ValueError, "top_k must be >= 1"),
        (dict(top_k=1, routed_logits=jnp.ones((2, 37, 7))), ValueError, "expected 1 .. H=6"),
        (dict(top_k=1, routed_logits=jnp.ones((2, 36, 4))), ValueError, "first two axes"),
        (dict(top_k=1, shared_logits=jnp.ones((2, 37, 3))), ValueError, "shared_logits has shape"),
        (dict(top_k=1, routed_logits=jnp.ones((2, 37, 6)), mix_logits=jnp.ones((2, 37, 2))), ValueError, "no shared heads"),
        (dict(top_k=1, skip_unselected=True, bias=jnp.zeros((1, 1, 37, 37))), NotImplementedError, "bias"),
    ],
    ids=["top_k_big", "top_k_zero", "too_many_routed", "bad_len", "shared_shape", "mix_without_shared", "skip_bias"],
)
def test_moh_validation(kw, err, match):
    q, k, v = _moh_qkv(MOH_SHAPE)
    routed = kw.pop("routed_logits", jnp.ones((2, 37, 4)))
    with pytest.raises(err, match=match):
        ops.moh_attention(q, k, v, routed, **kw)
