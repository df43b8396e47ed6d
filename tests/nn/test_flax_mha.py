"""``nn.MultiHeadAttention`` is a drop-in for ``flax.nnx.MultiHeadAttention``: the same arguments
build the same parameter tree, a Flax model's parameters load with ``nnx.update`` and give Flax's
outputs (self and cross attention, masks, ``is_causal``, extra batch axes, bf16, decoding one
token at a time), and dropout follows Flax's ``deterministic``/``rngs`` protocol."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import nn
from tests import harness

C, H, B, T = 16, 4, 2, 7

CONFIGS = {
    "defaults": {},
    "gqa_normalize_qk": dict(num_kv_heads=2, normalize_qk=True, qkv_features=24, out_features=12),
    "cross_no_bias": dict(in_kv_features=10, use_bias=False, qkv_features=8),
}


def _pair(cfg, dtype=None):
    """Flax's module and ours (another seed), ours loaded with Flax's parameters."""
    theirs = nnx.MultiHeadAttention(H, C, **cfg, dtype=dtype, decode=False, rngs=nnx.Rngs(0))
    ours = nn.MultiHeadAttention(H, C, **cfg, dtype=dtype, rngs=nnx.Rngs(1))
    nnx.update(ours, nnx.state(theirs, nnx.Param))
    return ours, theirs


def _x(shape, key):
    return jax.random.normal(jax.random.key(key), shape)


def _run(m, *args, **kw):
    return nnx.jit(lambda m, *a: m(*a, **kw))(m, *args)


def _param_shapes(m):
    return {path: x.shape for path, x in nnx.to_flat_state(nnx.state(m, nnx.Param))}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_parameter_tree(name):
    cfg = CONFIGS[name]
    theirs = nnx.MultiHeadAttention(H, C, **cfg, decode=False, rngs=nnx.Rngs(0))
    ours = nn.MultiHeadAttention(H, C, **cfg, rngs=nnx.Rngs(0))
    assert _param_shapes(ours) == _param_shapes(theirs)
    # Flax's order of creation: one seed gives Flax's initial parameters.
    for a, b in zip(
        jax.tree.leaves(nnx.state(ours, nnx.Param)), jax.tree.leaves(nnx.state(theirs, nnx.Param))
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("call", ["self", "causal", "kv_padding_mask", "per_head_mask", "cross"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loaded_parameters_give_flax_outputs(name, call):
    cfg = CONFIGS[name]
    ours, theirs = _pair(cfg)
    x = _x((B, T, C), 0)
    args, kw = (x,), {}
    if name == "cross_no_bias" or call == "cross":
        kv_c = cfg.get("in_kv_features", C)
        args = (x, _x((B, 9, kv_c), 1), _x((B, 9, kv_c), 2))
    S = args[1].shape[1] if len(args) > 1 else T
    if call == "causal":
        kw = dict(is_causal=True)
        if S != T:
            pytest.skip("is_causal with T != S: Flax aligns it top-left, attnjax bottom-right (documented)")
    if call == "kv_padding_mask":  # the last keys of batch element 1 are padding
        valid = jnp.arange(S)[None, :] < jnp.array([[S], [S - 3]])
        kw = dict(mask=nnx.make_attention_mask(jnp.ones((B, T), bool), valid))
    if call == "per_head_mask":  # [1, H, T, S], every row keeps its first key
        kw = dict(mask=jax.random.bernoulli(jax.random.key(3), 0.6, (1, H, T, S)).at[..., 0].set(True))
    harness.assert_close(_run(ours, *args, **kw), _run(theirs, *args, **kw), 1e-5, f"{name} {call}")


def test_extra_batch_axes_and_bf16():
    ours, theirs = _pair({})
    x = _x((2, 3, T, C), 0)
    harness.assert_close(_run(ours, x, is_causal=True), _run(theirs, x, is_causal=True), 1e-5, "batch axes")
    ours, theirs = _pair(dict(num_kv_heads=2), dtype=jnp.bfloat16)
    x = _x((B, T, C), 1)
    got, want = _run(ours, x), _run(theirs, x)
    assert got.dtype == want.dtype == jnp.bfloat16
    harness.assert_close(got.astype(jnp.float32), want.astype(jnp.float32), 2e-2, "bf16")


@pytest.mark.parametrize("masked", [False, True], ids=["occupancy", "flax_mask"])
def test_decode_one_token_at_a_time_as_flax(masked):
    """Flax's decoding protocol: ``init_cache(x.shape)``, one token per call with
    ``decode=True``; a mask array addresses absolute cache positions, as Flax's does."""
    ours, theirs = _pair(dict(num_kv_heads=2, normalize_qk=True))
    max_length, steps = 8, 6
    x = _x((B, steps, C), 0)
    # Batch element 1 never sees position 1 (slot 0 stays visible: no empty row).
    mask = jnp.ones((B, 1, 1, max_length), bool).at[1, :, :, 1].set(False) if masked else None
    outs = []
    for m in (ours, theirs):
        m.init_cache((B, max_length, C))
        step = nnx.jit(lambda m, x: m(x, mask=mask, decode=True))
        outs.append(jnp.concatenate([step(m, x[:, t : t + 1]) for t in range(steps)], axis=1))
    harness.assert_close(outs[0], outs[1], 1e-5, "decode")
    assert int(ours.cache_index[...]) == int(theirs.cache_index[...]) == steps
    assert ours.cached_key[...].shape == theirs.cached_key[...].shape


def test_dropout_protocol():
    x = _x((B, T, C), 0)
    m = nn.MultiHeadAttention(H, C, dropout_rate=0.3, rngs=nnx.Rngs(0, dropout=1))
    plain = nn.MultiHeadAttention(H, C, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs deterministic="):
        m(x)
    harness.assert_close(m(x, deterministic=True), plain(x), 1e-6, "deterministic")
    a = m(x, deterministic=False, rngs=nnx.Rngs(dropout=5))
    b = m(x, deterministic=False, rngs=nnx.Rngs(dropout=5))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(plain(x)), atol=1e-3)
    assert not np.allclose(np.asarray(m(x, deterministic=False)), np.asarray(m(x, deterministic=False)))
    with pytest.raises(ValueError, match="needs an attention_fn taking dropout_rate and dropout_key"):
        nn.MultiHeadAttention(
            H, C, dropout_rate=0.1, attention_fn=lambda q, k, v, mask=None: q, rngs=nnx.Rngs(0)
        )


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda m: m.init_cache(4), TypeError, "input_shape is Flax's"),
        (lambda m: m.init_cache((2, 8, C), batch_size=2), TypeError, "not both"),
        (lambda m: m(_x((B, T, C), 0), sow_weights=True), NotImplementedError, "sow_weights"),
        (lambda m: m(_x((B, T, C), 0), mask=jnp.ones((B, 3, T, T), bool)), ValueError, "broadcastable to"),
        (
            lambda m: m(_x((B, T, C), 0), mask=[[True]]),
            TypeError,
            "mask must be an attnjax.masks mask or an array",
        ),
        (lambda m: m(_x((B, T, C), 0), inputs_v=_x((B, T, C), 1)), ValueError, "inputs_k cannot be None"),
        (
            lambda m: m(_x((B, T, 8), 0)),
            ValueError,
            r"inputs_q must have shape \[batch..., length, in_features=16\]",
        ),
    ],
    ids=[
        "init_cache_int",
        "init_cache_both",
        "sow_weights",
        "mask_heads",
        "mask_type",
        "inputs_v_alone",
        "in_features",
    ],
)
def test_errors(make, err, match):
    with pytest.raises(err, match=match):
        make(nn.MultiHeadAttention(H, C, rngs=nnx.Rngs(0)))
