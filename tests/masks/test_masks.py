"""Masks: predicates against independent numpy formulas; block maps against dense tiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnjax import masks
from attnjax.masks import EMPTY, FULL, PARTIAL
from tests.harness import MASK_EXPRS, dense_tile_classes, segments as _segments

B = 2


def numpy_mask(kind, T, S):
    """Independent dense formulas, [B, T, S] booleans (bottom-right aligned positions)."""
    q = np.arange(T)[:, None] + (S - T)
    kv = np.arange(S)[None, :]
    seg_q, seg_kv = _segments(0, B, T), _segments(1, B, S)
    table = {
        "causal": kv <= q,
        "window_7": (kv <= q) & (kv >= q - 7),
        "window_5_3": (kv >= q - 5) & (kv <= q + 3),
        "chunked_16": (q // 16) == (kv // 16),
        "prefix_20": (kv <= q) | (kv < 20),
        "document": seg_q[:, :, None] == seg_kv[:, None, :],
        "not_causal": ~(kv <= q),
        "causal_or_window": (kv <= q) | ((kv >= q - 2) & (kv <= q + 2)),
        "from_fn": (np.arange(T)[:, None] + np.arange(S)[None, :]) % 3 != 0,
        "padding": (np.arange(S)[None, None, :] < np.array(_kv_lengths(S))[:, None, None])
        & (np.arange(T)[None, :, None] < np.array(_q_lengths(T))[:, None, None]),
    }
    out = table[kind]
    return np.broadcast_to(out, (B, T, S))


def attnjax_mask(kind, T, S):
    seg_q, seg_kv = _segments(0, B, T), _segments(1, B, S)
    return {
        "causal": masks.causal(),
        "window_7": masks.sliding_window(7),
        "window_5_3": masks.sliding_window(5, 3),
        "chunked_16": masks.chunked(16),
        "prefix_20": masks.prefix_lm(20),
        "document": masks.document(seg_q, seg_kv),
        "not_causal": ~masks.causal(),
        "causal_or_window": masks.causal() | masks.sliding_window(2, 2),
        "from_fn": masks.from_fn(lambda b, h, q, kv: (q + kv) % 3 != 0),
        "padding": masks.padding(jnp.array(_kv_lengths(S)), jnp.array(_q_lengths(T))),
    }[kind]


def _kv_lengths(S):  # one full row, one cut mid-tile
    return [S, max(S // 2 + 3, 1) if S > 3 else 1]


def _q_lengths(T):
    return [max(T - 5, 1), T]


KINDS = ["causal", "window_7", "window_5_3", "chunked_16", "prefix_20", "document", "not_causal",
         "causal_or_window", "from_fn", "padding"]
SIZES = [(63, 63), (63, 100), (100, 37), (1, 50), (97, 97)]


@pytest.mark.parametrize("T,S", SIZES, ids=lambda x: str(x))
@pytest.mark.parametrize("kind", KINDS)
def test_predicate_matches_formula(kind, T, S):
    got = np.asarray(attnjax_mask(kind, T, S).materialize(T, S, batch=B))[:, 0]
    np.testing.assert_array_equal(np.broadcast_to(got, (B, T, S)), numpy_mask(kind, T, S))


@pytest.mark.parametrize("blocks", [(8, 8), (16, 32), (32, 8)], ids=lambda b: f"bq{b[0]}bk{b[1]}")
@pytest.mark.parametrize("T,S", SIZES, ids=lambda x: str(x))
@pytest.mark.parametrize("kind", KINDS)
def test_block_map(kind, T, S, blocks):
    """Exact for every primitive; a union may call a tile PARTIAL that is in fact FULL
    (two partial tiles can cover it), which costs speed, never correctness."""
    bq, bk = blocks
    m = attnjax_mask(kind, T, S)
    got = np.asarray(m.block_map(T, S, bq, bk, batch=B))[:, 0]
    want = dense_tile_classes(numpy_mask(kind, T, S), bq, bk)
    got = np.broadcast_to(got, want.shape)
    if kind == "causal_or_window":
        assert np.all((got == want) | ((got == PARTIAL) & (want == FULL)))
        assert (got == want).mean() > 0.9
    else:
        np.testing.assert_array_equal(got, want)


def test_causal_bottom_right_alignment():
    # T < S (decoding with a cache): the last query sees every key, the first sees S - T + 1.
    m = np.asarray(masks.causal().materialize(3, 5))[0, 0]
    np.testing.assert_array_equal(m.sum(1), [3, 4, 5])
    # T > S: the first T - S queries see nothing.
    m = np.asarray(masks.causal().materialize(5, 3))[0, 0]
    np.testing.assert_array_equal(m.sum(1), [0, 0, 1, 2, 3])


def test_prefix_lm_per_batch_lengths():
    m = masks.prefix_lm(jnp.array([0, 4]))
    dense = np.asarray(m.materialize(6, 6, batch=2))[:, 0]
    np.testing.assert_array_equal(dense[0], np.tril(np.ones((6, 6), bool)))
    assert dense[1, 0, :4].all() and not dense[1, 0, 4:].any()


def test_padding_scalar_lengths_and_errors():
    m = np.asarray(masks.padding(3, q_lengths=2).materialize(4, 5))[0, 0]
    np.testing.assert_array_equal(m, (np.arange(4)[:, None] < 2) & (np.arange(5)[None, :] < 3))
    with pytest.raises(TypeError, match="lengths must be an integer array"):
        masks.padding(jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="q_lengths must be >= 0"):
        masks.padding(3, q_lengths=-1)
    with pytest.raises(ValueError, match=r"padding's lengths\) must be a scalar or have shape \[batch=2\]"):
        masks.padding(jnp.array([1, 2, 3])).check(2, 1, 4, 4)


def test_head_dependent_from_fn_keeps_per_head_maps():
    # Head h sees only keys congruent to h mod 2: different tiles per head.
    m = masks.from_fn(lambda b, h, q, kv: kv // 8 % 2 == h, heads=2)
    bm = np.asarray(m.block_map(16, 32, 8, 8))
    assert bm.shape == (1, 2, 2, 4)
    np.testing.assert_array_equal(bm[0, 0, 0], [FULL, EMPTY, FULL, EMPTY])
    np.testing.assert_array_equal(bm[0, 1, 0], [EMPTY, FULL, EMPTY, FULL])


def test_block_map_under_jit_with_traced_segment_ids():
    seg = jnp.asarray(_segments(3, B, 64))

    @jax.jit
    def f(seg):
        return (masks.causal() & masks.document(seg)).block_map(64, 64, 16, 16, batch=B)

    want = dense_tile_classes(np.asarray((masks.causal() & masks.document(seg)).materialize(64, 64, batch=B))[:, 0], 16, 16)
    np.testing.assert_array_equal(np.asarray(f(seg))[:, 0], want)


def test_block_map_at_a_million_tokens_is_cheap():
    """The block map never materializes [T, S]: at 1M tokens it is an [nq, nk] computation."""
    n = 1 << 20
    fn = jax.jit(lambda: masks.causal().block_map(n, n, 1024, 1024))
    jaxpr = jax.make_jaxpr(fn)()
    biggest = max(np.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars)
    assert biggest <= (n // 1024) ** 2
    bm = fn()
    assert bm.shape == (1, 1, 1024, 1024)
    assert int((bm == FULL).sum()) == 1024 * 1023 // 2 and int((bm == PARTIAL).sum()) == 1024


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: masks.sliding_window(-1), ValueError),
        (lambda: masks.sliding_window(3, -2), ValueError),
        (lambda: masks.chunked(0), ValueError),
        (lambda: masks.chunked(2.5), TypeError),
        (lambda: masks.prefix_lm(-3), ValueError),
        (lambda: masks.document(jnp.zeros((4,), jnp.int32)), ValueError),
        (lambda: masks.document(jnp.zeros((2, 4), jnp.float32)), TypeError),
        (lambda: masks.from_fn(3), TypeError),
        (lambda: masks.causal() & 3, TypeError),
    ],
    ids=["window-neg", "window-right-neg", "chunk-zero", "chunk-float", "prefix-neg", "doc-rank",
         "doc-dtype", "fn-not-callable", "and-non-mask"],
)
def test_constructor_errors(make, error):
    with pytest.raises(error):
        make()


# ------------------------------------------------------------------------------------------
# Random compositions: the block map must be conservative-correct for any expression.



@settings(max_examples=60, deadline=None)
@given(mask=MASK_EXPRS, bq=st.sampled_from([4, 8, 16]), bk=st.sampled_from([4, 8, 16]))
def test_random_expressions_block_map_is_conservative(mask, bq, bk):
    T = S = 45
    dense = np.asarray(mask.materialize(T, S, batch=B))
    dense = np.broadcast_to(dense, (B,) + dense.shape[1:])
    exact = dense_tile_classes(dense, bq, bk)
    got = np.broadcast_to(np.asarray(mask.block_map(T, S, bq, bk, batch=B)), exact.shape)
    # EMPTY and FULL claims must be true; PARTIAL is always safe.
    assert np.all((got != EMPTY) | (exact == EMPTY))
    assert np.all((got != FULL) | (exact == FULL))
