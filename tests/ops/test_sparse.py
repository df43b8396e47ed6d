"""Routed and sparse long-context variants (issue 10A): BiFormer bi-level routing, Routing
Transformer, MoA, HyperAttention, landmark attention.

Each efficient (gathered / block-skipping) path is checked against its dense reference, values
and gradients (float32; bfloat16 for BiFormer and landmark retrieval, the other paths' inner
calls being ops.attention, whose bf16 behaviour its own suite covers), with the discrete routing (top-k regions, clusters, LSH and samples, retrieved
blocks) computed identically on both sides, hence held fixed for the gradients. Equations are
checked by hand on small cases, and approximations against exact attention.
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

GQA = Shape(B=2, T=37, S=37, H=4, K=2, D=12, E=10)  # ragged for every block size used below


def _np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _vjp(op, args, dtype=jnp.float32, **kw):
    harness.check_vjp(functools.partial(op, implementation="xla", **kw),
                      functools.partial(op, implementation="reference", **kw), args, dtype, what=op.__name__)


# -- BiFormer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)], ids=["f32", "bf16"])
def test_biformer_1d_gathered_matches_reference(dtype):
    _vjp(ops.biformer_attention, GQA.qkv(jax.random.key(0)), dtype, region_size=5, top_k=3)


def test_biformer_traced_routing_counts_what_the_reference_counts():
    """Traced routing (no value check possible): indices outside [0, regions) are dropped and a
    repeated one counts once, on the gathered path as in the reference (it gave NaN)."""
    q, k, v = GQA.qkv(jax.random.key(0))
    routing = jnp.array([[[0, 1, 7]] * 8] * 2, jnp.int32).at[0, 2].set(jnp.array([8, 3, 3])).at[1, 0, 1].set(-5)
    run = lambda impl: jax.jit(lambda q, k, v, r: ops.biformer_attention(q, k, v, region_size=5, top_k=3, routing=r,
                                                                          implementation=impl))
    harness.check_vjp(lambda q, k, v: run("xla")(q, k, v, routing), lambda q, k, v: run("reference")(q, k, v, routing),
                      (q, k, v), jnp.float32, what="traced routing")


def test_biformer_2d_gathered_matches_reference():
    q, k, v = (x.reshape(1, 9, 7, *x.shape[2:]) for x in Shape(B=1, T=63, S=63, H=2, K=2, D=8, E=8).qkv(jax.random.key(1)))
    _vjp(ops.biformer_attention, (q, k, v), region_size=(4, 3), top_k=4)


def test_biformer_routing_and_equation_by_hand():
    """Region means (real tokens only), affinity summed over heads, top-k, then softmax over the
    routed regions' tokens, for a ragged 1-D input (T=10, regions of 4: the last has 2 tokens)."""
    q, k, v = (np.asarray(x, np.float64) for x in Shape(B=1, T=10, S=10, H=2, K=2, D=3, E=2).qkv(jax.random.key(2)))
    regions = [range(0, 4), range(4, 8), range(8, 10)]
    qm = np.stack([q[0, list(r)].mean(0) for r in regions])  # [n, H, D]
    km = np.stack([k[0, list(r)].mean(0) for r in regions])
    affinity = np.einsum("ihd,jhd->ij", qm, km)
    top = np.argsort(-affinity, axis=1)[:, :2]
    f = lambda x: jnp.asarray(x, jnp.float32)
    got, out = jax.jit(lambda q, k, v: (ops.bilevel_routing(q, k, region_size=4, top_k=2),
                                        ops.biformer_attention(q, k, v, region_size=4, top_k=2)))(f(q), f(k), f(v))
    np.testing.assert_array_equal(np.sort(np.asarray(got[0]), 1), np.sort(top, 1))
    expected = np.zeros((10, 2, 2))
    for i, r in enumerate(regions):
        keys = [s for j in top[i] for s in regions[j]]
        for t in r:
            for h in range(2):
                w = _np_softmax(q[0, t, h] @ k[0, keys, h].T / np.sqrt(3))
                expected[t, h] = w @ v[0, keys, h]
    np.testing.assert_allclose(np.asarray(out[0]), expected, rtol=1e-5, atol=1e-6)


# -- Routing Transformer ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_routing_gathered_matches_reference(causal):
    shape = GQA if causal else Shape(B=2, T=29, S=41, H=4, K=2, D=12, E=10)
    mu = ops.routing_init(jax.random.key(3), shape.H, 5, shape.D)
    q, k, v = shape.qkv(jax.random.key(4))
    _vjp(lambda q, k, v, implementation: ops.routing_attention(q, k, v, mu, is_causal=causal, implementation=implementation),
         (q, k, v))


def test_routing_one_cluster_is_full_attention():
    """One centroid with the default window takes every query and key: exact attention."""
    q, k, v = GQA.qkv(jax.random.key(6))
    mu = ops.routing_init(jax.random.key(0), GQA.H, 1, GQA.D)
    out, exact = jax.jit(lambda q, k, v: (ops.routing_attention(q, k, v, mu, is_causal=True),
                                          ops.attention(q, k, v, mask=masks.causal(), implementation="reference")))(q, k, v)
    harness.assert_close(out, exact, 2e-5)


def test_routing_clusters_and_update_by_hand():
    shape = Shape(B=1, T=8, S=8, H=1, K=1, D=4, E=4)
    q, k, _ = shape.qkv(jax.random.key(7))
    mu = ops.routing_init(jax.random.key(8), 1, 2, 4)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    qn, kn, m = unit(np.asarray(q[0, :, 0], np.float64)), unit(np.asarray(k[0, :, 0], np.float64)), np.asarray(mu[0], np.float64)
    q_idx, k_idx = jax.jit(functools.partial(ops.routing_clusters, window=3))(mu, q, k)
    for c in range(2):
        np.testing.assert_array_equal(q_idx[0, 0, c], np.sort(np.argsort(-(qn @ m[c]))[:3]))
        np.testing.assert_array_equal(k_idx[0, 0, c], np.sort(np.argsort(-(kn @ m[c]))[:3]))
    x = np.concatenate([qn, kn])
    assign = (x @ m.T).argmax(1)
    expected = m.copy()
    for c in range(2):
        if (assign == c).any():
            expected[c] = 0.7 * m[c] + 0.3 * x[assign == c].mean(0)
    expected = unit(expected)
    np.testing.assert_allclose(jax.jit(functools.partial(ops.routing_update, decay=0.7))(mu, q, k)[0], expected,
                               rtol=1e-5, atol=1e-6)


def test_routing_update_finds_clusters():
    """Tokens drawn around two directions: repeated updates move each centroid onto one of them."""
    centers = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0]])
    noise = 0.05 * np.asarray(jax.random.normal(jax.random.key(9), (1, 64, 1, 4)))
    x = jnp.asarray(centers[np.arange(64) % 2][None, :, None] + noise, jnp.float32)
    # Start each centroid nearer one center (k-means cannot revive a centroid nothing is near).
    mu = jnp.asarray([[[0.8, 0.5, 0.3, 0.1], [0.3, -0.4, 0.8, 0.3]]], jnp.float32)
    update = jax.jit(functools.partial(ops.routing_update, decay=0.5))
    for _ in range(20):
        mu = update(mu, x, x)
    cos = np.asarray(mu[0]) @ centers.T  # [2 centroids, 2 centers]
    assert (cos.max(0) > 0.99).all() and (cos.max(1) > 0.99).all(), cos


def test_routing_module_is_projections_op_and_update():
    """The module's output is out(op(query(x), key(x), value(x), centroids)); a training call then
    moves the centroids by routing_update, and they are not Params (an optimizer skips them)."""
    from flax import nnx

    from attnjax import nn

    m = nn.RoutingAttention(2, 16, num_clusters=3, is_causal=True, decay=0.9, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(24), (1, 20, 16))
    mu = m.centroids[...]

    @nnx.jit
    def run(m, x):
        q, k, v = m.query(x), m.key(x), m.value(x)
        expected = m.out(ops.routing_attention(q, k, v, mu, is_causal=True))
        return m(x, update=True), expected, ops.routing_update(mu, q, k, decay=0.9)

    y, expected, new_mu = run(m, x)
    harness.assert_close(y, expected, 1e-6)
    harness.assert_close(m.centroids[...], new_mu, 1e-6)
    assert not jnp.allclose(m.centroids[...], mu)
    assert len(jax.tree.leaves(nnx.state(m, nn.Centroids))) == 1
    assert len(jax.tree.leaves(nnx.state(m, nnx.Param))) == 4  # the four projections' kernels


# -- MoA ------------------------------------------------------------------------------------------

MOA = dict(alpha=(2, 6, 0, 6), beta=(0.0, 0.1, 0.25, 0.1), sinks=3)


@pytest.mark.parametrize("sizes", [(37, 37, 8, 16), (45, 20, 4, 4)], ids=str)
def test_moa_block_map_is_exact_per_head(sizes):
    T, S, bq, bk = sizes
    m = masks.moa(**MOA)
    dense = np.asarray(m.materialize(T, S, heads=4))
    pad = lambda x, fill: np.pad(x, ((0, 0), (0, 0), (0, -T % bq), (0, -S % bk)), constant_values=fill)
    real = pad(np.ones((1, 1, T, S), bool), False)
    nq, nk = real.shape[2] // bq, real.shape[3] // bk
    tiles = lambda x: x.reshape(x.shape[0], x.shape[1], nq, bq, nk, bk)
    any_ = tiles(pad(dense, False) & real).any((3, 5))
    all_ = tiles(pad(dense, True) | ~real).all((3, 5))
    expected = np.where(any_, np.where(all_, masks.FULL, masks.PARTIAL), masks.EMPTY)
    np.testing.assert_array_equal(np.asarray(m.block_map(T, S, bq, bk)), expected)


def test_moa_spans_and_mask_by_hand():
    m = masks.moa(alpha=(1, 2), beta=(0.0, 0.5), sinks=1)
    assert m.spans(6) == (1, 5)
    dense = np.asarray(m.materialize(4, 6, heads=2))[0]
    for h, span in enumerate((1, 5)):
        for i in range(4):
            p = i + 2
            expected = [(j <= p) and (j > p - span or j < 1) for j in range(6)]
            np.testing.assert_array_equal(dense[h, i], expected)


def test_moa_per_span_calls_match_reference():
    # float32 only: every call is ops.attention, whose bf16 behaviour its own suite covers.
    _vjp(ops.moa_attention, GQA.qkv(jax.random.key(11)), block_sizes=ops.BlockSizes(8, 8), **MOA)


def test_moa_dropout_differs_per_head_as_in_the_reference():
    """Heads in different span groups drop different weights: the per-span calls drop exactly the
    reference's (dropout hashes the global head), values and gradients."""
    kw = dict(MOA, dropout_rate=0.3, dropout_key=jax.random.key(5))
    _vjp(ops.moa_attention, GQA.qkv(jax.random.key(11)), block_sizes=ops.BlockSizes(8, 8), **kw)


def test_moa_per_head_score_mod_as_in_the_reference():
    """A per-head score mod (ALiBi slopes [H]) on the per-span calls: each group's heads get their
    own slopes (the groups see global heads; it raised a shape error)."""
    from attnjax import score_mods

    _vjp(ops.moa_attention, GQA.qkv(jax.random.key(11)), block_sizes=ops.BlockSizes(8, 8),
         score_mod=score_mods.alibi(score_mods.alibi_slopes(4)), **MOA)


def test_moa_group_calls_skip_their_own_tiles():
    """A call holding heads 1 and 3 (``Shard.head_ids``) plans the tiles of those heads only."""
    from attnjax import normalizers
    from attnjax.core import tiling

    T, m = 96, masks.moa(alpha=(8, 40, 8, 8), beta=(0.0,) * 4, sinks=0)
    shard = ops.Shard.make(batch=1, heads=4, q_len=T, kv_len=T, head_ids=[0, 2])
    problem = tiling.Problem(tiling.Dims(1, T, T, 2, 2, 8, 8), 1.0, m, None, normalizers.softmax(), shard=shard)
    expected = masks.collapse(m.block_map(T, T, 16, 16)[:, jnp.array([0, 2])])
    np.testing.assert_array_equal(np.asarray(tiling.tile_plan(problem, 16, 16)), np.asarray(expected))
    assert (np.asarray(expected) != masks.EMPTY).sum() < (np.asarray(masks.collapse(m.block_map(T, T, 16, 16))) != masks.EMPTY).sum()


def test_moa_groups_heads_by_span_under_jit_and_shards(monkeypatch):
    """One call per distinct span also under jit and with a batch shard (static head indices)."""
    from attnjax.ops.sparse import moa

    calls = []
    monkeypatch.setattr(moa, "attention", lambda q, *a, **kw: calls.append(q.shape[2]) or jnp.zeros(q.shape))
    q = jnp.zeros((2, 16, 4, 8))
    kw = dict(alpha=(2, 6, 2, 6), beta=(0.0,) * 4)
    shard = ops.Shard.make(batch=4, heads=4, q_len=16, kv_len=16, batch_offset=jnp.int32(2))
    jax.make_jaxpr(lambda q: ops.moa_attention(q, q, q, **kw))(q)
    jax.make_jaxpr(lambda q: ops.moa_attention(q, q, q, shard=shard, **kw))(q)
    assert calls == [2, 2, 2, 2]


def test_moa_mask_in_generic_attention():
    q, k, v = GQA.qkv(jax.random.key(12))
    mask = masks.moa(**MOA)
    harness.check_vjp(lambda q, k, v: ops.attention(q, k, v, mask=mask, implementation="xla", block_sizes=ops.BlockSizes(8, 8)),
                      lambda q, k, v: ops.attention(q, k, v, mask=mask, implementation="reference"), (q, k, v), jnp.float32)


def test_moa_skips_per_head():
    """Per-span calls visit each head's own non-empty tiles; one generic call visits, for every
    head, the tiles non-empty for any head (the block map reduced over heads)."""
    T = S = 512
    m = masks.moa(alpha=(16, 16, 32, 64), beta=(0.0, 0.0, 0.0, 0.25), sinks=4)
    per_head = np.asarray(m.block_map(T, S, 32, 32)[0] != masks.EMPTY)  # [H, nq, nk]
    collapsed = np.asarray(masks.collapse(m.block_map(T, S, 32, 32)) != masks.EMPTY)
    # 235 tiles over the four heads against 4 x 100: the narrow heads no longer pay for the wide one.
    assert per_head.sum() < 0.6 * 4 * collapsed.sum(), (per_head.sum(), collapsed.sum())


# -- HyperAttention ---------------------------------------------------------------------------------

HYPER = dict(bucket_size=8, sample_size=10, num_projections=4)


def test_hyper_gathered_matches_reference():
    """Causal, one split (37 -> 18 + 19): the lower-left block is the non-causal estimate on a
    ragged 19 x 18 problem, merged with the causal halves, so both forms are covered."""
    _vjp(ops.hyper_attention, GQA.qkv(jax.random.key(13)), key=jax.random.key(14), is_causal=True, min_seq_len=20, **HYPER)


def test_hyper_exact_limits():
    """One block holding every key, or a sample of every key, is exact attention."""
    q, k, v = GQA.qkv(jax.random.key(17))
    key = jax.random.key(18)
    one_block, all_sampled, exact = jax.jit(lambda q, k, v: (
        ops.hyper_attention(q, k, v, key=key, bucket_size=37, sample_size=5),
        ops.hyper_attention(q, k, v, key=key, bucket_size=4, sample_size=37),
        ops.attention(q, k, v, implementation="reference")))(q, k, v)
    harness.assert_close(one_block, exact, 2e-5, "b >= S")
    harness.assert_close(all_sampled, exact, 2e-5, "m = S")


def test_hyper_error_falls_with_sample_size():
    """Relative error against exact attention, averaged over 4 seeds, falls as the column sample
    grows (blocks of 16 out of 256 keys, so the sample carries most of the mass), and more
    samples never do worse than the blocks alone."""
    B, T, H, D = 1, 256, 2, 16
    q, k, v = Shape(B=B, T=T, S=T, H=H, K=H, D=D, E=D).qkv(jax.random.key(19), scale=0.6)
    exact = ops.attention(q, k, v, implementation="reference")
    run = jax.jit(lambda key, m: ops.hyper_attention(q, k, v, key=key, bucket_size=16, sample_size=m), static_argnums=1)
    errors = [np.mean([harness.rel_rmse(run(jax.random.key(s), m), exact) for s in range(4)]) for m in (8, 48, 240)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0], errors


# -- Landmark attention ----------------------------------------------------------------------------


def _landmark_args(shape, key):
    q, k, v = shape.qkv(key)
    marks = harness.normal(jax.random.fold_in(key, 1), (shape.B, -(-shape.S // 8), shape.K, shape.D))
    return q, k, v, marks


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)], ids=["f32", "bf16"])
def test_landmark_retrieval_matches_reference(dtype):
    shape = Shape(B=2, T=29, S=61, H=4, K=2, D=12, E=10)  # decoding-like: the last 29 of 61 tokens
    _vjp(ops.landmark_attention, _landmark_args(shape, jax.random.key(20)), dtype, block_len=8, top_k=2)


def test_landmark_grouped_softmax_by_hand():
    """One head, blocks of 3: outer softmax over the local tokens and earlier landmarks, inner
    softmax within each retrieved block; top_k=1 keeps the best landmark only. (With top_k=None
    the op has no gathered path and falls back to the reference.)"""
    q, k, v = (np.asarray(x, np.float64) for x in Shape(B=1, T=8, S=8, H=1, K=1, D=4, E=3).qkv(jax.random.key(21)))
    marks = np.asarray(jax.random.normal(jax.random.key(23), (1, 3, 1, 4)), np.float64)
    sc = 0.5
    for top_k in (None, 1):
        expected = np.zeros((8, 3))
        for p in range(8):
            c = p // 3
            local = list(range(3 * c, p + 1))
            land = {j: q[0, p, 0] @ marks[0, j, 0] * sc for j in range(c)}
            if top_k:
                land = dict(sorted(land.items(), key=lambda kv: -kv[1])[:top_k])
            logits = np.concatenate([q[0, p, 0] @ k[0, local, 0].T * sc, list(land.values())])
            g = _np_softmax(logits)
            out = g[: len(local)] @ v[0, local, 0]
            for gj, j in zip(g[len(local):], land):
                blk = range(3 * j, 3 * j + 3)
                out = out + gj * (_np_softmax(q[0, p, 0] @ k[0, blk, 0].T * sc) @ v[0, blk, 0])
            expected[p] = out
        f = lambda x: jnp.asarray(x, jnp.float32)
        for impl in ("reference",) if top_k else (None,):  # xla vs reference: the retrieval test
            got = jax.jit(functools.partial(ops.landmark_attention, block_len=3, top_k=top_k, scale=sc,
                                            implementation=impl))(f(q), f(k), f(v), f(marks))
            np.testing.assert_allclose(np.asarray(got[0, :, 0]), expected, rtol=1e-5, atol=1e-6, err_msg=f"{impl} {top_k}")


# -- validation ------------------------------------------------------------------------------------


def test_validation():
    q, k, v = GQA.qkv(jax.random.key(0))
    with pytest.raises(ValueError, match="top_k=9 must be <= the number of regions"):
        ops.biformer_attention(q, k, v, region_size=5, top_k=9)
    with pytest.raises(ValueError, match="region_size"):
        ops.biformer_attention(q, k, v, region_size=(2, 2), top_k=1)
    routing = jnp.array([[[0, 1, 7]] * 8] * 2, jnp.int32)  # 8 regions of 5 tokens: 7 is the last
    with pytest.raises(ValueError, match=r"routing indices must be regions in \[0, 8\); got \[-1, 8\]"):
        ops.biformer_attention(q, k, v, region_size=5, top_k=3, routing=routing.at[0, 2, 0].set(8).at[1, 0, 1].set(-1))
    with pytest.raises(ValueError, match="distinct regions"):
        ops.biformer_attention(q, k, v, region_size=5, top_k=3, routing=routing.at[0, 0, 1].set(0))
    with pytest.raises(ValueError, match="centroids has shape"):
        ops.routing_attention(q, k, v, jnp.ones((4, 3, 5)))
    with pytest.raises(ValueError, match="moa mask has 2 heads"):
        ops.moa_attention(q, k, v, alpha=(1, 2), beta=(0, 0))
    with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
        masks.moa(alpha=(-1,), beta=(0,))
    with pytest.raises(ValueError, match="length, as in q"):
        ops.hyper_attention(q[:, :20], k, v, key=jax.random.key(0), is_causal=True)
    with pytest.raises(ValueError, match=r"landmark_k has shape .* blocks=ceil\(S / block_len\)=5"):
        ops.landmark_attention(q, k, v, jnp.ones((2, 4, 2, 12)), block_len=8)
