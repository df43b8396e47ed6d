"""Bad input gets a ValueError/TypeError that names the argument and the expected shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks, normalizers, ops, score_mods

B, T, S, H, K, D = 2, 8, 12, 4, 2, 16


def qkv(**over):
    shapes = {"q": (B, T, H, D), "k": (B, S, K, D), "v": (B, S, K, D)}
    arrays = {n: jnp.zeros(s, jnp.float32) for n, s in shapes.items()}
    arrays.update(over)
    return arrays["q"], arrays["k"], arrays["v"]


CASES = [
    # (id, kwargs for qkv, op kwargs, error type, message fragment)
    ("q-rank", dict(q=jnp.zeros((B, T, D))), {}, ValueError, r"query must have rank 4 .*\[batch, q_len, heads, head_dim\].*\(2, 8, 16\)"),
    ("k-rank", dict(k=jnp.zeros((B, S, K, D, 1))), {}, ValueError, r"key must have rank 4"),
    ("v-not-array", dict(v=[[1.0]]), {}, TypeError, r"value must be an array"),
    ("q-int", dict(q=jnp.zeros((B, T, H, D), jnp.int32)), {}, TypeError, r"query must be a floating-point array; got dtype int32"),
    ("mixed-dtypes", dict(k=jnp.zeros((B, S, K, D), jnp.bfloat16)), {}, TypeError, r"one dtype"),
    ("batch-mismatch", dict(k=jnp.zeros((3, S, K, D)), v=jnp.zeros((3, S, K, D))), {}, ValueError, r"key has shape \(3, 12, 2, 16\); its axis 0 \(batch, as in query\) must be 2"),
    ("head-dim-mismatch", dict(k=jnp.zeros((B, S, K, 8))), {}, ValueError, r"axis 3 \(head_dim, as in query\) must be 16"),
    ("v-length-mismatch", dict(v=jnp.zeros((B, S + 1, K, D))), {}, ValueError, r"value has shape \(2, 13, 2, 16\).*must match key's"),
    ("heads-not-dividing", dict(k=jnp.zeros((B, S, 3, D)), v=jnp.zeros((B, S, 3, D))), {}, ValueError, r"key has 3 heads .* must divide the 4 query heads"),
    ("empty-sequence", dict(q=jnp.zeros((B, 0, H, D))), {}, ValueError, r"q_len and kv_len must be >= 1"),
    ("bias-shape", {}, dict(bias=jnp.zeros((B, H, T, S + 1))), ValueError, r"bias has shape \(2, 4, 8, 13\); expected a shape broadcastable to \[batch=2 or 1, heads=4 or 1, q_len=8 or 1, kv_len=12 or 1\]"),
    ("bias-rank", {}, dict(bias=jnp.zeros((1, B, H, T, S))), ValueError, r"bias must have rank 4"),
    ("mask-type", {}, dict(mask=[[True]]), TypeError, r"mask must be an attnjax.masks mask, a boolean array or None"),
    ("mask-dtype", {}, dict(mask=jnp.ones((T, S))), TypeError, r"mask must be boolean \(True = attend\); got dtype float32 \(an additive mask goes in bias\)"),
    ("mask-shape", {}, dict(mask=jnp.ones((B, 3, T, S), bool)), ValueError, r"mask has shape \(2, 3, 8, 12\); expected a shape broadcastable to \[batch=2 or 1, heads=4 or 1, q_len=8 or 1, kv_len=12 or 1\]"),
    ("mask-rank", {}, dict(mask=jnp.ones((1, B, H, T, S), bool)), ValueError, r"mask has shape \(1, 2, 4, 8, 12\); expected rank <= 4"),
    ("is-causal-type", {}, dict(is_causal=jnp.array(True)), TypeError, r"is_causal must be a Python bool"),
    ("kv-lengths-shape", {}, dict(key_value_seq_lengths=jnp.array([3, 4, 5])), ValueError, r"key_value_seq_lengths must have shape \[batch=2\]; got shape \(3,\)"),
    ("q-lengths-dtype", {}, dict(query_seq_lengths=jnp.array([3.0, 4.0])), TypeError, r"query_seq_lengths must be an integer array; got dtype float32"),
    ("window-negative", {}, dict(local_window_size=(2, -1)), ValueError, r"local_window_size right must be >= 0; got -1"),
    ("window-triple", {}, dict(local_window_size=(1, 2, 3)), ValueError, r"local_window_size must be an int or a \(left, right\) pair"),
    ("document-ids-shape", {}, dict(mask=masks.document(jnp.zeros((B, T + 1), jnp.int32), jnp.zeros((B, S), jnp.int32))), ValueError, r"q_segment_ids has shape \(2, 9\); expected \[batch=2, q_len=8\]"),
    ("prefix-shape", {}, dict(mask=masks.prefix_lm(jnp.array([1, 2, 3]))), ValueError, r"prefix_lm's prefix_len, padding's lengths\) must be a scalar or have shape \[batch=2\]"),
    ("from-fn-heads", {}, dict(mask=masks.from_fn(lambda b, h, q, kv: q >= kv, heads=3)), ValueError, r"declared with heads=3; the op has 4 heads"),
    ("alibi-shape", {}, dict(score_mod=score_mods.alibi(jnp.ones(3))), ValueError, r"alibi slopes must be a scalar or have shape \[heads=4\]"),
    ("relative-table", {}, dict(score_mod=score_mods.relative_bias(jnp.ones((H, 4)))), ValueError, r"relative_bias table must have shape \[heads=4, 2 \* max_distance \+ 1\]"),
    ("score-mod-type", {}, dict(score_mod=3.0), TypeError, r"score_mod must be a ScoreMod"),
    ("normalizer-name", {}, dict(normalizer="softmaxx"), ValueError, r"normalizer must be one of"),
    ("sigmoid-bias-with-softmax", {}, dict(sigmoid_bias=-1.0), ValueError, r"sigmoid_bias is only used with normalizer='sigmoid'"),
    ("lse-with-sigmoid", {}, dict(normalizer="sigmoid", return_lse=True), ValueError, r"return_lse needs a row-normalized normalizer"),
    ("scale-array", {}, dict(scale=jnp.float32(0.1)), TypeError, r"scale must be a Python number"),
    ("scale-nan", {}, dict(scale=float("nan")), ValueError, r"scale must be a finite number; got nan"),
    ("scale-inf", {}, dict(scale=float("inf")), ValueError, r"scale must be a finite number; got inf"),
    ("sigmoid-bias-nan", {}, dict(normalizer="sigmoid", sigmoid_bias=float("nan")), ValueError, r"sigmoid_bias must be finite"),
    ("score-mod-shape", {}, dict(score_mod=lambda s, b, h, q, kv: s[..., 0]), ValueError,
     r"score_mod must return float scores of the shape it is given; given float32\[2, 4, 2, 3\].*returned float32\[2, 4, 2\]"),
    ("score-mod-dtype", {}, dict(score_mod=lambda s, b, h, q, kv: s > 0), ValueError, r"score_mod must return float scores.*returned bool"),
    ("implementation-name", {}, dict(implementation="cuda"), ValueError, r"implementation must be None, one of"),
    ("block-sizes-type", {}, dict(block_sizes=(16, 16)), TypeError, r"block_sizes must be an attnjax.ops.BlockSizes"),
]


@pytest.mark.parametrize("arrays, kwargs, error, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(arrays, kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.attention(*qkv(**arrays), **kwargs)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: ops.BlockSizes(block_q=0), ValueError, r"BlockSizes.block_q must be >= 1; got 0"),
        (lambda: score_mods.softcap(0.0), ValueError, r"softcap cap must be > 0"),
        (lambda: score_mods.alibi_slopes(0), ValueError, r"num_heads must be >= 1"),
        (lambda: normalizers.elementwise("relu"), TypeError, r"needs a callable"),
        (lambda: masks.sliding_window(-2), ValueError, r"sliding_window left must be >= 0; got -2"),
        (lambda: masks.chunked(0), ValueError, r"chunked size must be >= 1; got 0"),
    ],
    ids=["block-size", "softcap", "alibi-heads", "normalizer-fn", "window", "chunk"],
)
def test_bad_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_traced_dropout_rate_is_refused_clearly():
    """A dropout rate traced under jit gets a TypeError with the way out, not a
    TracerBoolConversionError from inside the op."""
    q, k, v = qkv()
    f = jax.jit(lambda q, rate: ops.attention(q, k, v, dropout_rate=rate, dropout_key=jax.random.key(0)))
    with pytest.raises(TypeError, match=r"dropout_rate must be a Python number, static under jit .*static_argnames"):
        f(q, 0.1)
