"""masks.by_type (zoo 4.14-4.16): rules as data, exact block maps on type runs, presets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, ops
from tests.harness import assert_close, dense_tile_classes, normal

TYPES = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]])


def _dense(m, n=11):
    return np.asarray(m.materialize(n, n, batch=2))


def test_all_causal_rules_are_causal():
    rules = {(a, b): "causal" for a in range(3) for b in range(3)}
    want = np.broadcast_to(np.asarray(masks.causal().materialize(11, 11)), (2, 1, 11, 11))
    np.testing.assert_array_equal(_dense(masks.by_type(TYPES, rules)), want)


def test_modality_mutual_by_hand():
    d = _dense(masks.modality_mutual(TYPES))[0, 0].astype(int)
    causal = np.tril(np.ones((11, 11), int))
    want = causal.copy()
    want[0:3, 3:5] = 1  # image queries see the whole prompt, never the response
    np.testing.assert_array_equal(d, want)


@pytest.mark.parametrize(
    "blocks",
    [(2, 3), pytest.param((4, 4), marks=pytest.mark.slow), pytest.param((3, 1), marks=pytest.mark.slow)],
)
def test_block_maps_are_exact_on_type_runs(blocks):
    for m in (
        masks.modality_mutual(TYPES),
        masks.mixformer(TYPES % 2),
        masks.by_type(
            TYPES, {(0, 0): "full", (2, 0): "full", (2, 2): "causal", (1, 1): masks.sliding_window(1)}
        ),
    ):
        got = np.asarray(m.block_map(11, 11, *blocks, batch=2))
        want = dense_tile_classes(_dense(m), *blocks)
        # conservative everywhere, exact where the tile's pairs are all "full" or absent
        assert ((got == want) | (got == masks.PARTIAL)).all()
    m = masks.mixformer(TYPES % 2)
    np.testing.assert_array_equal(
        np.asarray(m.block_map(11, 11, *blocks, batch=2)), dense_tile_classes(_dense(m), *blocks)
    )


@pytest.mark.slow
def test_mixformer_templates_ignore_search_and_xla_matches_reference():
    types = jnp.array([[0] * 5 + [1] * 8])
    m = masks.mixformer(types)
    q, k, v = (normal(kk, (1, 13, 2, 8)) for kk in jax.random.split(jax.random.key(0), 3))
    run = jax.jit(lambda q, k, v, impl: ops.attention(q, k, v, mask=m, implementation=impl), static_argnums=3)
    out = run(q, k, v, "xla")
    assert_close(out, run(q, k, v, "reference"), 2e-5, "mixformer xla")
    out2 = run(q, k.at[:, 5:].set(1.0), v.at[:, 5:].set(-3.0), "xla")
    assert_close(out2[:, :5], out[:, :5], 1e-6, "templates independent of search")


def test_bad_rules():
    with pytest.raises(ValueError, match="rule for"):
        masks.by_type(TYPES, {(0, 0): "window"})
    with pytest.raises(ValueError, match="at least one"):
        masks.by_type(TYPES, {(0, 0): "none"})
    with pytest.raises(ValueError, match="int pairs"):
        masks.by_type(TYPES, {0: "full"})


@pytest.mark.slow
def test_isolation_and_speaker_heads():
    subj = jnp.array([[0, 1, 1, 2, 2, 0, 1]])
    d = np.asarray(masks.isolation(subj, 2).materialize(7, 7, batch=1))[0, 0]
    s = np.asarray(subj[0])
    want = (s[:, None] == s[None]) | (s[:, None] == 0) | (s[None] == 0)
    np.testing.assert_array_equal(d, want)
    spk = jnp.array([[0, 1, 0, 0, 1]])
    m = masks.speaker_heads(spk, jnp.array([True, False]))
    d = np.asarray(m.materialize(5, 5, batch=1, heads=2))[0]
    causal = np.tril(np.ones((5, 5), bool))
    same = np.asarray(spk[0])[:, None] == np.asarray(spk[0])[None]
    np.testing.assert_array_equal(d[0], same & causal)
    np.testing.assert_array_equal(d[1], ~same & causal)
    # a one-speaker dialogue leaves the inter-speaker heads empty: zeros
    q = normal(jax.random.key(0), (1, 5, 2, 4))
    out = ops.attention(q, q, q, mask=masks.speaker_heads(jnp.zeros((1, 5), int), jnp.array([True, False])))
    assert not np.asarray(out[:, :, 1]).any() and np.asarray(out[:, :, 0]).any()
    bm = np.asarray(m.block_map(5, 5, 2, 2, batch=1))
    want = dense_tile_classes(np.asarray(m.materialize(5, 5, batch=1, heads=2)), 2, 2)
    assert ((bm == want) | (bm == masks.PARTIAL)).all()


def test_vidt_and_composite_by_hand():
    types = jnp.array([[0, 0, 0, 0, 1, 1]])  # 4 patches (two windows of 2), 2 [DET]
    d = np.asarray(masks.vidt(types, masks.chunked(2)).materialize(6, 6, batch=1))[0, 0].astype(int)
    want = np.zeros((6, 6), int)
    want[0:2, 0:2] = want[2:4, 2:4] = 1  # patches: their window, never [DET]
    want[4:, :] = 1  # [DET] sees [DET] and every patch
    np.testing.assert_array_equal(d, want)
    d = np.asarray(masks.composite(jnp.array([[0, 0, 1, 1, 1]])).materialize(5, 5, batch=1))[0, 0].astype(int)
    want = np.zeros((5, 5), int)
    want[2:, :2] = 1
    want[2:, 2:] = np.tril(np.ones((3, 3), int))
    np.testing.assert_array_equal(d, want)
