"""Blockwise attention in pure JAX: memory O(T x tile), empty tiles skipped, custom backward.

Queries are cut into tiles of ``block_q`` rows and processed one tile row at a time; for each,
only the key tiles that the mask's block map says are non-empty are visited, in a loop whose
trip count is that row's number of non-empty tiles. FULL tiles skip mask evaluation entirely.
Softmax keeps a running max and sum per row ("online softmax", Milakov & Gimelshein 2018;
FlashAttention); elementwise normalizers (sigmoid, ...) just accumulate ``f(S) V``.

The backward pass recomputes each tile's logits instead of storing the ``[T, S]`` matrix
(FlashAttention-2's recomputation), differentiating the shared :func:`_common.logits` with
``jax.vjp`` so that gradients reach score-mod parameters (ALiBi slopes, relative tables, ...) and
the additive bias exactly and deterministically (tiles are visited in a fixed order).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import _checks
from attnjax.masks import FULL
from attnjax.ops import _common
from attnjax.ops._common import Problem


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the blockwise paths (``xla`` and ``pallas``).

    Tiles are clipped to the (8-rounded) sequence lengths, so small inputs use one tile. The
    defaults were the fastest or within 6% of it for causal attention at T=8K on a 2-core CPU
    (256x256: 0.78 s, 512x512: 0.91 s, 1024x1024: 1.42 s, 256x1024: 0.74 s), and small key tiles
    skip more of sparse masks.
    """

    block_q: int = 256
    block_k: int = 256

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            _checks.positive_int(f"BlockSizes.{name}", getattr(self, name))


def attention(problem: Problem, q, k, v, bias, block_sizes: BlockSizes | None = None):
    """Returns ``(out [B, T, H, E], lse [B, T, H])`` like :func:`reference.attention`."""
    d = problem.dims
    bs = block_sizes or BlockSizes()
    bq = min(bs.block_q, _common.round_up(d.q_len, 8))
    bk = min(bs.block_k, _common.round_up(d.kv_len, 8))
    classes, t_pad, s_pad = _common.tile_plan(problem, bq, bk)
    plan = (classes, *_common.compact(classes))

    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
    if bias is not None:
        bias = jnp.pad(bias, [(0, 0), (0, 0), (0, t_pad if bias.shape[2] > 1 else 0),
                              (0, s_pad if bias.shape[3] > 1 else 0)])
    static = _common.Tiling(d, problem.scale, bq, bk)
    out, lse = _blockwise(
        static, pad(q, t_pad), pad(k, s_pad), pad(v, s_pad), bias,
        problem.mask, problem.score_mod, problem.normalizer, problem.dropout, problem.shard, plan,
    )
    return out[:, : d.q_len], lse[:, :, : d.q_len].transpose(0, 2, 1)


def _bias_tile(bias, i, kt, bq, bk):
    if bias is None:
        return None
    tq, tk = bias.shape[2] > 1, bias.shape[3] > 1
    starts = (0, 0, i * bq if tq else 0, kt * bk if tk else 0)
    sizes = (bias.shape[0], bias.shape[1], bq if tq else 1, bk if tk else 1)
    return lax.dynamic_slice(bias, starts, sizes)


def _add_at(x, update, starts):
    """``x[starts : starts + update.shape] += update``."""
    return lax.dynamic_update_slice(x, lax.dynamic_slice(x, starts, update.shape) + update, starts)


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


class _Tile:
    """Index bookkeeping of tile row ``i`` against its ``j``-th non-empty key tile."""

    def __init__(self, static: _common.Tiling, plan, i, j):
        _, order, _ = plan
        self.kt = order[i, j]
        self.q_start, self.kv_start = i * static.block_q, self.kt * static.block_k
        self.q_idx = self.q_start + jnp.arange(static.block_q, dtype=jnp.int32)
        self.kv_idx = self.kv_start + jnp.arange(static.block_k, dtype=jnp.int32)

    def keys(self, x, bk):
        return lax.dynamic_slice_in_dim(x, self.kv_start, bk, axis=1)


def _row_loop(plan, i, body, init):
    """Runs ``body(tile_index_j, masked: bool, carry)`` over row ``i``'s non-empty key tiles,
    choosing the masked or the mask-free variant per tile (FULL tiles need no mask)."""
    classes, order, counts = plan

    def step(j, carry):
        full = classes[i, order[i, j]] == FULL
        return lax.cond(full, functools.partial(body, j, False), functools.partial(body, j, True), carry)

    return lax.fori_loop(0, counts[i], step, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(static, q, k, v, bias, mask, score_mod, normalizer, dropout, shard, plan):
    return _forward(static, q, k, v, bias, mask, score_mod, normalizer, dropout, shard, plan)


def _forward(static: _common.Tiling, q, k, v, bias, mask, score_mod, normalizer, dropout, shard, plan):
    problem = Problem(static.dims, static.scale, mask, score_mod, normalizer, dropout, shard)
    B, H, E = static.dims.batch, static.dims.heads, static.dims.v_dim
    S = problem.lengths[1]
    bq, bk = static.block_q, static.block_k
    nq = q.shape[1] // bq

    def tile_row(i):
        q_i = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)  # [B, bq, H, D]

        def body(j, masked, carry):
            t = _Tile(static, plan, i, j)
            k_j, v_j = t.keys(k, bk), t.keys(v, bk)
            s = _common.logits(problem, score_mod, q_i, k_j, _bias_tile(bias, i, t.kt, bq, bk),
                               t.q_idx, t.kv_idx)  # [B, H, bq, bk]
            ok = _common.allowed(problem, t.q_idx, t.kv_idx) if masked else None
            zs = _common.dropout_scale(problem, t.q_idx, t.kv_idx)
            pv = lambda p: _common.weighted_values(p, v_j)
            if normalizer.row_normalized:
                return _common.softmax_update(carry, _common.masked_logits(s, ok, -jnp.inf), pv, zs)
            return (carry[0] + pv(_common.elementwise_weights(normalizer, S, s, ok, zs)),)

        zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
        acc0 = zeros(B, H, bq, E)
        if not normalizer.row_normalized:
            (acc,) = _row_loop(plan, i, body, (acc0,))
            return acc.transpose(0, 2, 1, 3).astype(q.dtype), zeros(B, H, bq)
        carry = _row_loop(plan, i, body, (jnp.full((B, H, bq), -jnp.inf), zeros(B, H, bq), acc0))
        out, lse = _common.softmax_finish(*carry)
        return out.transpose(0, 2, 1, 3).astype(q.dtype), lse

    out, lse = lax.map(tile_row, jnp.arange(nq))  # [nq, B, bq, H, E], [nq, B, H, bq]
    out = jnp.moveaxis(out, 0, 1).reshape(B, nq * bq, H, E)
    lse = jnp.moveaxis(lse, 0, 2).reshape(B, H, nq * bq)
    return out, lse


def _blockwise_fwd(static, q, k, v, bias, mask, score_mod, normalizer, dropout, shard, plan):
    out, lse = _forward(static, q, k, v, bias, mask, score_mod, normalizer, dropout, shard, plan)
    return (out, lse), (q, k, v, bias, mask, score_mod, normalizer, dropout, shard, plan, out, lse)


def _blockwise_bwd(static: _common.Tiling, res, cotangents):
    q, k, v, bias, mask, score_mod, normalizer, dropout, shard, plan, out, lse = res
    d_out, d_lse = cotangents
    problem = Problem(static.dims, static.scale, mask, score_mod, normalizer, dropout, shard)
    S = problem.lengths[1]
    bq, bk = static.block_q, static.block_k
    nq = q.shape[1] // bq

    f32 = lambda x: x.astype(jnp.float32)
    zeros_like = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
    d_out = f32(d_out)
    # delta = rowsum(dO * O) - dlse: the softmax backward's correction (FlashAttention-2), [B, H, T].
    delta = (d_out * f32(out)).sum(-1).transpose(0, 2, 1) - d_lse
    lse = jnp.where(jnp.isneginf(lse), 0.0, lse)  # rows with no key: their p is 0 regardless

    def tile_row(carry, i):
        sl = lambda x, axis: lax.dynamic_slice_in_dim(x, i * bq, bq, axis=axis)
        q_i, do_i = sl(q, 1), sl(d_out, 1)  # [B, bq, H, D], [B, bq, H, E]
        lse_i, delta_i = sl(lse, 2)[..., None], sl(delta, 2)[..., None]  # [B, H, bq, 1]

        def body(j, masked, c):
            dq_i, dk, dv, dbias, dmod, dnorm = c
            t = _Tile(static, plan, i, j)
            k_j, v_j = t.keys(k, bk), t.keys(v, bk)
            logits = lambda q_, k_, b_, m_: _common.logits(problem, m_, q_, k_, b_, t.q_idx, t.kv_idx)
            s, logits_vjp = jax.vjp(logits, q_i, k_j, _bias_tile(bias, i, t.kt, bq, bk), score_mod)
            ok = _common.allowed(problem, t.q_idx, t.kv_idx) if masked else None
            dp = _common.scores(do_i, v_j, 1.0)  # dO V^T, [B, H, bq, bk]
            zs = _common.dropout_scale(problem, t.q_idx, t.kv_idx)
            p, ds, dnorm_t = _common.tile_backward(normalizer, S, s, ok, lse_i, delta_i, dp, zs)
            dq_t, dk_j, dbias_t, dmod_t = logits_vjp(ds)
            dv_j = _values_grad(p, do_i, dv.shape[2])
            if dbias is not None:
                dbias = _add_at(dbias, dbias_t, (0, 0, t.q_start if bias.shape[2] > 1 else 0,
                                                 t.kv_start if bias.shape[3] > 1 else 0))
            return (
                dq_i + dq_t,
                _add_at(dk, dk_j, (0, t.kv_start, 0, 0)),
                _add_at(dv, dv_j, (0, t.kv_start, 0, 0)),
                dbias,
                _tree_add(dmod, dmod_t),
                _tree_add(dnorm, dnorm_t),
            )

        dk, dv, dbias, dmod, dnorm = carry
        dq_i, dk, dv, dbias, dmod, dnorm = _row_loop(
            plan, i, body, (jnp.zeros(q_i.shape, jnp.float32), dk, dv, dbias, dmod, dnorm)
        )
        return (dk, dv, dbias, dmod, dnorm), dq_i

    init = (
        jnp.zeros(k.shape, jnp.float32),
        jnp.zeros(v.shape, jnp.float32),
        None if bias is None else jnp.zeros(bias.shape, jnp.float32),
        zeros_like(score_mod),
        zeros_like(normalizer),
    )
    (dk, dv, dbias, dmod, dnorm), dq = lax.scan(tile_row, init, jnp.arange(nq))
    dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape)
    cast = lambda g, x: g.astype(x.dtype)
    none = lambda tree: jax.tree.map(lambda _: None, tree)
    return (
        cast(dq, q), cast(dk, k), cast(dv, v),
        None if bias is None else cast(dbias, bias),
        none(mask), jax.tree.map(cast, dmod, score_mod), jax.tree.map(cast, dnorm, normalizer),
        none(dropout), none(shard), none(plan),
    )


def _values_grad(p, do_i, kv_heads):
    """``P^T dO`` summed over the query heads that share a key head: ``[B, bk, K, E]``."""
    B, H, t, s = p.shape
    pg = p.reshape(B, kv_heads, H // kv_heads, t, s)
    dog = do_i.reshape(B, t, kv_heads, H // kv_heads, do_i.shape[-1])
    return jnp.einsum("bkgts,btkge->bske", pg, dog, precision=lax.Precision.HIGHEST)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
