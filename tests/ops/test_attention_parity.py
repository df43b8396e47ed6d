"""Parity with ``jax.nn.dot_product_attention``: attnjax masks against jax.nn's arguments, and
the drop-in table (the same jax.nn call through both functions).

jax.nn aligns ``is_causal`` top-left, so the mask-object cases use T == S (where both alignments
agree); the drop-in table passes ``is_causal`` itself, also with T != S. Its
``local_window_size=(left, right)`` is our ``sliding_window(left, right, align="top_left")``.
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

CASES = {
    "causal": (dict(is_causal=True), dict(mask=masks.causal())),
    "window": (dict(local_window_size=(5, 3)), dict(mask=masks.sliding_window(5, 3))),
    "causal_window": (dict(is_causal=True, local_window_size=(7, 0)), dict(mask=masks.sliding_window(7))),
    "full": ({}, {}),
}


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [Shape(B=2, T=45, S=45, H=4, K=2, D=32, E=32), Shape(B=1, T=64, S=64, H=2, K=1, D=16, E=16)],
    ids=str,
)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_jax_nn(case, shape, dtype, impl):
    jax_kw, our_kw = CASES[case]
    ours = lambda q, k, v: ops.attention(
        q, k, v, implementation=impl, block_sizes=ops.BlockSizes(16, 16), **our_kw
    )
    theirs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **jax_kw)
    # Both run in `dtype`; jax.nn computes softmax probabilities in the input dtype, so the
    # tolerance is that of the dtype against an f32 computation.
    harness.check_vjp(ours, theirs, shape.qkv(jax.random.key(0)), dtype, what=case)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_bias_matches_jax_nn(impl):
    s = Shape(B=2, T=30, S=50, H=4, K=4, D=16, E=16)
    bias = harness.normal(jax.random.key(5), (1, s.H, s.T, s.S))
    ours = lambda q, k, v, b: ops.attention(
        q, k, v, bias=b, implementation=impl, block_sizes=ops.BlockSizes(16, 16)
    )
    theirs = lambda q, k, v, b: jax.nn.dot_product_attention(q, k, v, bias=b)
    harness.check_vjp(ours, theirs, (*s.qkv(jax.random.key(0)), bias), jnp.float32)


def test_lse_matches_jax_nn_residual():
    s = Shape(B=1, T=32, S=32, H=2, K=2, D=16, E=16)
    q, k, v = s.qkv(jax.random.key(0))
    _, lse = ops.attention(q, k, v, mask=masks.causal(), return_lse=True, implementation="xla")
    _, their_lse = jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    harness.assert_close(lse, their_lse, 1e-5, "lse")


# -- the drop-in table: the same call, the same arguments, to both ----------------------------------
#
# Each case is a jax.nn.dot_product_attention call (its keywords, its positional bias/mask), run
# through both functions unchanged. Tolerances are derived from float64: jax.nn on the inputs
# upcast to float64 (the exact answer up to float64 rounding) is the truth; ours may be off by at
# most twice jax.nn's own error in the test dtype, plus a small floor. Masks keep at least one key
# per query row: there the two differ by design (zeros here, the mean of the values in jax.nn).

B, T, S, H, K, D = 2, 37, 37, 4, 2, 16
CROSS_T, CROSS_S = 20, 45


def _bool(seed, shape, p=0.7):
    m = jax.random.bernoulli(jax.random.key(seed), p, shape)
    if shape[-2] == shape[-1] and shape[-1] > 1:  # keep the diagonal: no empty rows
        m = m | jnp.eye(shape[-1], dtype=bool)
    elif shape[-1] > 1:
        m = m.at[..., 0].set(True)
    return m


def _lengths(*xs):
    return jnp.array(xs, jnp.int32)


# name -> (sizes (B, T, S, H, K) or None for the default, kwargs, positional extras)
TABLE = {
    "mha": (dict(K=H), {}),
    "gqa_causal": ({}, dict(is_causal=True)),
    "mqa_causal_window": (dict(K=1), dict(is_causal=True, local_window_size=(5, 0))),
    "window_int": ({}, dict(local_window_size=3)),
    "window_left_right": ({}, dict(local_window_size=(4, 2))),
    "scale": ({}, dict(scale=0.3, is_causal=True)),
    "mask_B1TS": ({}, dict(mask=_bool(1, (B, 1, T, S)))),
    "mask_1HTS": ({}, dict(mask=_bool(2, (1, H, T, S)))),
    "mask_TS": ({}, dict(mask=_bool(3, (T, S)))),
    "mask_B11S_causal": ({}, dict(mask=_bool(4, (B, 1, 1, S)), is_causal=True)),
    "mask_BH1S": ({}, dict(mask=_bool(5, (B, H, 1, S)))),
    "bias_1HTS": ({}, dict(bias=0.5 * jax.random.normal(jax.random.key(6), (1, H, T, S)))),
    "bias_B1TS_causal": ({}, dict(bias=jax.random.normal(jax.random.key(7), (B, 1, T, S)), is_causal=True)),
    "bias_TS_mask": (
        {},
        dict(bias=jax.random.normal(jax.random.key(8), (T, S)), mask=_bool(9, (B, H, T, S))),
    ),
    "kv_lengths": ({}, dict(key_value_seq_lengths=_lengths(S, S - 11))),
    "q_kv_lengths_causal": (
        {},
        dict(query_seq_lengths=_lengths(T - 3, 5), key_value_seq_lengths=_lengths(S - 9, S), is_causal=True),
    ),
    "cross_mask_lengths": (
        dict(T=CROSS_T, S=CROSS_S),
        dict(mask=_bool(10, (B, 1, CROSS_T, CROSS_S)), key_value_seq_lengths=_lengths(CROSS_S, 30)),
    ),
    "cross_causal": (dict(T=CROSS_T, S=CROSS_S), dict(is_causal=True)),  # top-left, as jax.nn
    "cross_causal_longer_queries": (dict(T=CROSS_S, S=CROSS_T), dict(is_causal=True)),
    "cross_window": (dict(T=CROSS_T, S=CROSS_S), dict(local_window_size=(3, 2))),
    "unbatched_causal": (dict(B=None), dict(is_causal=True)),
    "positional_bias_mask": (
        {},
        dict(positional=(jax.random.normal(jax.random.key(11), (1, H, T, S)), _bool(12, (B, 1, T, S)))),
    ),
}


def _inputs(sizes, seed=0):
    s = dict(B=B, T=T, S=S, H=H, K=K) | sizes
    b = () if s["B"] is None else (s["B"],)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (*b, s["T"], s["H"], D)),
        jax.random.normal(kk, (*b, s["S"], s["K"], D)),
        jax.random.normal(kv, (*b, s["S"], s["K"], D)),
    )


def _value_and_grads(fn, args, kwargs, dtype):
    """``fn(*args, **kwargs)`` and the vjp of every float argument (q, k, v and any bias) with one
    fixed random cotangent, everything cast to ``dtype``."""
    positional = kwargs.pop("positional", ())
    bias = kwargs.pop("bias", None)
    diff = (*args, *positional[:1]) if positional else (*args, *(() if bias is None else (bias,)))
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    diff = tuple(cast(x) for x in diff)
    rest = positional[1:]
    kwargs = {n: cast(x) if isinstance(x, jax.Array) else x for n, x in kwargs.items()}

    def call(*d):
        if positional:
            return fn(*d, *rest, **kwargs)
        extra = {} if bias is None else dict(bias=d[3])
        return fn(*d[:3], **extra, **kwargs)

    out, vjp = jax.vjp(call, *diff)
    ct = jax.random.normal(jax.random.key(99), out.shape).astype(out.dtype)
    return out, vjp(ct)


_JAX_NN = {}


def _jax_nn(case, dtype, rounded):
    """jax.nn's values and gradients in ``dtype`` and in float64 (once per case and dtype)."""
    key = (case, jnp.dtype(dtype).name)
    if key not in _JAX_NN:
        kwargs = TABLE[case][1]
        fn = jax.nn.dot_product_attention
        theirs = jax.jit(lambda *a: _value_and_grads(fn, a, dict(kwargs), dtype))(*rounded)
        with jax.enable_x64(True):
            truth = jax.jit(lambda *a: _value_and_grads(fn, a, dict(kwargs), jnp.float64))(
                *[x.astype(jnp.float64) for x in rounded]
            )
        _JAX_NN[key] = theirs, truth
    return _JAX_NN[key]


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(TABLE))
def test_drop_in_table(case, dtype, impl):
    sizes, kwargs = TABLE[case]
    args = _inputs(sizes)
    ours_fn = functools.partial(ops.attention, implementation=impl, block_sizes=ops.BlockSizes(16, 16))
    # Everything runs on inputs already rounded to the test dtype, so only arithmetic differs.
    rounded = [x.astype(dtype).astype(jnp.float32) for x in args]
    ours = jax.jit(lambda *a: _value_and_grads(ours_fn, a, dict(kwargs), dtype))(*rounded)
    theirs, truth = _jax_nn(case, dtype, rounded)
    floor = {jnp.float32: 1e-6, jnp.bfloat16: 1e-3}[dtype]
    names = ["out", *(f"grad[{i}]" for i in range(len(truth[1])))]
    for name, x, y, t in zip(names, [ours[0], *ours[1]], [theirs[0], *theirs[1]], [truth[0], *truth[1]]):
        assert x.shape == t.shape and x.dtype == dtype, f"{case} {name}: {x.shape} {x.dtype}"
        ours_err, their_err = harness.rel_err(x, t), harness.rel_err(y, t)
        assert ours_err <= 2 * their_err + floor, (
            f"{case} {name}: error vs float64 {ours_err:.3g}, jax.nn's {their_err:.3g}"
        )


def test_drop_in_names_and_cudnn_dispatch():
    """Keywords by jax.nn's names; ``implementation="cudnn"`` declines off GPU with a reason."""
    q, k, v = _inputs({})
    ours = ops.attention(query=q, key=k, value=v, is_causal=True)
    theirs = jax.nn.dot_product_attention(query=q, key=k, value=v, is_causal=True)
    harness.assert_close(ours, theirs, 1e-5, "by name")
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="cudnn: cuDNN attention needs an NVIDIA GPU"):
            ops.attention(q, k, v, is_causal=True, implementation="cudnn")


def test_drop_in_masks_keep_tile_skipping():
    """is_causal, windows and sequence lengths become analytic masks: the blockwise path skips
    the tiles they hide (the dense mask array would not be analytic)."""
    from attnjax.core import tiling
    from attnjax.ops.attention import api

    m = api.jax_nn_mask(
        is_causal=True, local_window_size=(8, 0), key_value_seq_lengths=_lengths(64, 20), sizes=(2, 4, 64, 64)
    )
    assert not any(
        isinstance(x, masks.Dense) for x in jax.tree.leaves(m, is_leaf=lambda x: isinstance(x, masks.Mask))
    )
    classes = np.asarray(m.block_map(64, 64, 16, 16, batch=2))
    assert (classes == tiling.EMPTY).sum() > classes.size // 2
