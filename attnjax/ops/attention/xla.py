"""Blockwise attention in pure JAX: memory O(T x tile), empty tiles skipped, custom backward.

Queries are cut into tiles of ``block_q`` rows and processed one tile row at a time; for each,
only the key tiles that the mask's block map says are non-empty are visited, in a loop whose
trip count is that row's number of non-empty tiles. FULL tiles skip mask evaluation entirely.
Softmax keeps a running max and sum per row ("online softmax", Milakov & Gimelshein 2018;
FlashAttention); elementwise normalizers (sigmoid, ...) just accumulate ``f(S) V``.

The backward pass recomputes each tile's logits instead of storing the ``[T, S]`` matrix
(FlashAttention-2's recomputation), differentiating the shared :func:`tiling.logits` with
``jax.vjp`` so that gradients reach score-mod parameters (ALiBi slopes, relative tables, ...) and
the additive bias exactly and deterministically (tiles are visited in a fixed order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.core import dispatch, tiling
from attnjax.core.blocks import BlockSizes
from attnjax.core.tiling import FULL, Problem
from attnjax.core.utils import round_up


def attention(problem: Problem, q, k, v, bias, block_sizes: BlockSizes | None = None):
    """Returns ``(out [B, T, H, E], lse [B, T, H])`` like :func:`reference.attention`.

    Tiles are ``block_sizes.forward`` (see :class:`attnjax.core.BlockSizes`), clipped to the
    8-rounded sequence lengths, so small inputs use one tile; the backward uses the same tiles.
    """
    if dispatch.autodiff(q, k, v, bias, problem).forward:
        raise NotImplementedError(
            "forward-mode autodiff (jax.jvp, jax.jacfwd, jax.hessian) cannot go through the blockwise "
            "path's custom backward (reverse mode of any order can); implementation='reference' supports it")
    d = problem.dims
    bq, bk = (block_sizes or BlockSizes()).resolve("xla").forward
    bq, bk = min(bq, round_up(d.q_len, 8)), min(bk, round_up(d.kv_len, 8))
    classes = tiling.tile_plan(problem, bq, bk)
    plan = (classes, *tiling.compact(classes))
    t_pad, s_pad = round_up(d.q_len, bq) - d.q_len, round_up(d.kv_len, bk) - d.kv_len

    # Heads first ([B, H, T, D]): every tile's products are then plain batched matmuls, with no
    # transpose per tile; the scale goes into q once (O(T D)) instead of into every tile's logits.
    # Both happen outside the custom VJP, so autodiff gives their (as cheap) backward.
    heads_first = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    if bias is not None:
        bias = jnp.pad(bias, [(0, 0), (0, 0), (0, t_pad if bias.shape[2] > 1 else 0),
                              (0, s_pad if bias.shape[3] > 1 else 0)])
    q = (q.astype(jnp.float32) * problem.scale).astype(q.dtype) if problem.scale != 1.0 else q
    problem = Problem(d, 1.0, problem.mask, problem.score_mod, problem.normalizer, problem.dropout, problem.shard)
    out, lse = _blockwise(tiling.Tiling(bq, bk), heads_first(q, t_pad), heads_first(k, s_pad), heads_first(v, s_pad),
                          bias, problem, plan)  # [B, H, T, E], [B, H, T]
    return out[:, :, : d.q_len].transpose(0, 2, 1, 3), lse[:, :, : d.q_len].transpose(0, 2, 1)


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


def _row_loop(plan, i, body, init, differentiable: bool = False):
    """Runs ``body(key_tile, masked: bool, carry)`` over row ``i``'s non-empty key tiles
    (FULL tiles need no mask); ``differentiable`` visits them in a reverse-differentiable loop."""
    classes, order, counts = plan
    args = (counts[i], lambda j: order[i, j], lambda kt: classes[i, kt] == FULL, body, init)
    return tiling.visit_all(classes.shape[1], *args) if differentiable else tiling.visit(*args)


def _indices(tiles: tiling.Tiling, i, kt):
    """Local positions ``(q_idx [bq], kv_idx [bk])`` of tile ``(i, kt)``."""
    q_idx = i * tiles.block_q + jnp.arange(tiles.block_q, dtype=jnp.int32)
    return q_idx, kt * tiles.block_k + jnp.arange(tiles.block_k, dtype=jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(tiles, q, k, v, bias, problem, plan):
    return _forward(tiles, q, k, v, bias, problem, plan)


def _keys(x, kt, bk):
    return lax.dynamic_slice_in_dim(x, kt * bk, bk, axis=2)


def _may_mask(problem: Problem, k) -> bool:
    """Whether some tile can be PARTIAL: a mask, a shard (keys outside the sequence) or padded keys."""
    return problem.mask is not None or problem.shard is not None or k.shape[2] != problem.dims.kv_len


def _tile_inputs(q_i, k, v, clean, kt, bk, masked: bool):
    """``(q, k, v)`` of key tile ``kt`` for query row tile ``q_i``: the raw inputs for a FULL tile
    (nothing is masked, so nothing to confine), for a PARTIAL tile those of ``clean`` (computed once
    per call, ``O(S D)``, so no tile pays for it): in the forward, the keys and values of
    :func:`attnjax.core.tiling.poison_keys` and the raw query, in the backward all three through
    :func:`attnjax.core.tiling.zero_non_finite` (``clean = (q_i, k, v)`` cleaned)."""
    if not masked:
        return q_i, _keys(k, kt, bk), _keys(v, kt, bk)
    q_c, k_c, v_c = clean
    return (q_i if q_c is None else q_c), _keys(k_c, kt, bk), _keys(v_c, kt, bk)


def _materialized(*xs):
    """``xs`` as they are, in the heads-first layout: the barrier keeps XLA from sinking the
    transposes to that layout back into the tile loop (which would transpose every tile's
    operands and, on CPU, compute ``K Q^T`` and read every tile's logits strided)."""
    return lax.optimization_barrier(xs)


def _forward(tiles: tiling.Tiling, q, k, v, bias, problem: Problem, plan):
    B, H, E = problem.dims.batch, problem.dims.heads, problem.dims.v_dim
    normalizer, S = problem.normalizer, problem.lengths[1]
    bq, bk = tiles.block_q, tiles.block_k
    nq = q.shape[2] // bq
    # What PARTIAL tiles read (non-finite inputs stay masked); nothing if no tile can be PARTIAL.
    q, k, v = _materialized(q, k, v)
    k_p, v_c = tiling.poison_keys(k, v) if _may_mask(problem, k) else (k, v)

    def tile_row(i):
        q_i = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=2)  # [B, H, bq, D]

        def body(kt, masked, carry):
            q_idx, kv_idx = _indices(tiles, i, kt)
            q_t, k_j, v_j = _tile_inputs(q_i, k, v, (None, k_p, v_c), kt, bk, masked)
            s = tiling.logits(problem, problem.score_mod, q_t, k_j, _bias_tile(bias, i, kt, bq, bk),
                              q_idx, kv_idx, heads_first=True)  # [B, H, bq, bk]
            ok = tiling.allowed(problem, q_idx, kv_idx) if masked else None
            zs = tiling.dropout_scale(problem, q_idx, kv_idx)
            pv = lambda p: tiling.weighted_values(p, v_j, heads_first=True)
            if normalizer.row_normalized:
                return tiling.softmax_update(carry, tiling.masked_logits(s, ok, -jnp.inf), pv, zs)
            return (carry[0] + pv(tiling.elementwise_weights(normalizer, S, s, ok, zs)),)

        zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
        acc0 = zeros(B, H, bq, E)
        if not normalizer.row_normalized:
            (acc,) = _row_loop(plan, i, body, (acc0,))
            return acc.astype(q.dtype), zeros(B, H, bq)
        carry = _row_loop(plan, i, body, (jnp.full((B, H, bq), -jnp.inf), zeros(B, H, bq), acc0))
        out, lse = tiling.softmax_finish(*carry)
        return out.astype(q.dtype), lse

    out, lse = lax.map(tile_row, jnp.arange(nq))  # [nq, B, H, bq, E], [nq, B, H, bq]
    out = jnp.moveaxis(out, 0, 2).reshape(B, H, nq * bq, E)
    lse = jnp.moveaxis(lse, 0, 2).reshape(B, H, nq * bq)
    return out, lse


# Higher-order reverse mode. The forward rule gets (out, lse) from _blockwise itself, so that when
# a gradient is differentiated again, the residuals' dependence on q, k, v goes through this same
# custom rule (the fori_loops of _forward are not reverse-differentiable). The backward rule is
# _gradients, a custom_vjp of its own: its primal is the fast backward (fori_loop over each row's
# non-empty tiles, unchanged first-order cost); its own backward differentiates the same code run
# with reverse-differentiable loops (tiling.visit_all), which only grad-of-grad ever traces.


def _blockwise_fwd(tiles, q, k, v, bias, problem, plan):
    out, lse = _blockwise(tiles, q, k, v, bias, problem, plan)
    return (out, lse), (q, k, v, bias, problem, plan, out, lse)


def _blockwise_bwd(tiles: tiling.Tiling, res, cotangents):
    return _gradients(tiles, *res, *cotangents)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gradients(tiles, q, k, v, bias, problem, plan, out, lse, d_out, d_lse):
    return _backward(tiles, False, q, k, v, bias, problem, plan, out, lse, d_out, d_lse)


def _gradients_fwd(tiles, *args):
    return _gradients(tiles, *args), args


def _gradients_bwd(tiles, args, cotangents):
    plan = args[5]
    rest = args[:5] + args[6:]
    backward = lambda *a: _backward(tiles, True, *a[:5], plan, *a[5:])
    _, vjp = jax.vjp(backward, *rest)
    grads = jax.tree.map(lambda g: None if g.dtype == jax.dtypes.float0 else g, vjp(cotangents))
    return (*grads[:5], jax.tree.map(lambda _: None, plan), *grads[5:])


_gradients.defvjp(_gradients_fwd, _gradients_bwd)


def _backward(tiles: tiling.Tiling, differentiable: bool, q, k, v, bias, problem, plan, out, lse, d_out, d_lse):
    """The blockwise backward: cotangents of ``(q, k, v, bias, problem, plan)``."""
    score_mod, normalizer, S = problem.score_mod, problem.normalizer, problem.lengths[1]
    bq, bk = tiles.block_q, tiles.block_k
    nq = q.shape[2] // bq

    f32 = lambda x: x.astype(jnp.float32)
    zeros_like = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
    d_out = f32(d_out)
    # delta = rowsum(dO * O) - dlse: the softmax backward's correction (FlashAttention-2), [B, H, T].
    delta = (d_out * f32(out)).sum(-1) - d_lse
    lse = jnp.where(jnp.isneginf(lse), 0.0, lse)  # rows with no key: their p is 0 regardless

    q, k, v, out, d_out = _materialized(q, k, v, out, d_out)
    q_c, k_c, v_c = tiling.zero_non_finite(q, k, v) if _may_mask(problem, k) else (q, k, v)

    def tile_row(carry, i):
        sl = lambda x, axis: lax.dynamic_slice_in_dim(x, i * bq, bq, axis=axis)
        q_i, do_i = sl(q, 2), sl(d_out, 2)  # [B, H, bq, D], [B, H, bq, E]
        lse_i, delta_i = sl(lse, 2)[..., None], sl(delta, 2)[..., None]  # [B, H, bq, 1]
        clean = (sl(q_c, 2), k_c, v_c)

        def body(kt, masked, c):
            dq_i, dk, dv, dbias, dmod, dnorm = c
            q_idx, kv_idx = _indices(tiles, i, kt)
            q_t, k_j, v_j = _tile_inputs(q_i, k, v, clean, kt, bk, masked)
            # The logits' products are differentiated by hand (two plain matmuls, below); autodiff
            # only differentiates what follows them (bias, score mod).
            qk = tiling.scores(q_t, k_j, problem.scale, heads_first=True)
            modified = lambda s_, b_, m_: tiling.modified_scores(problem, m_, s_, b_, q_idx, kv_idx)
            s, modified_vjp = jax.vjp(modified, qk, _bias_tile(bias, i, kt, bq, bk), score_mod)
            ok = tiling.allowed(problem, q_idx, kv_idx) if masked else None
            dp = tiling.scores(do_i, v_j, 1.0, heads_first=True)  # dO V^T, [B, H, bq, bk]
            zs = tiling.dropout_scale(problem, q_idx, kv_idx)
            p, ds, dnorm_t = tiling.tile_backward(normalizer, S, s, ok, lse_i, delta_i, dp, zs)
            d_qk, dbias_t, dmod_t = modified_vjp(ds)
            d_qk = d_qk if problem.scale == 1.0 else d_qk * problem.scale
            dq_t = tiling.weighted_values(d_qk, k_j, heads_first=True)  # dS K, [B, H, bq, D]
            dk_j = _values_grad(d_qk, q_t, dk.shape[1])  # dS^T Q
            dv_j = _values_grad(p, do_i, dv.shape[1])  # P^T dO
            if dbias is not None:
                dbias = _add_at(dbias, dbias_t, (0, 0, i * bq if bias.shape[2] > 1 else 0,
                                                 kt * bk if bias.shape[3] > 1 else 0))
            return (
                dq_i + dq_t,
                _add_at(dk, dk_j, (0, 0, kt * bk, 0)),
                _add_at(dv, dv_j, (0, 0, kt * bk, 0)),
                dbias,
                _tree_add(dmod, dmod_t),
                _tree_add(dnorm, dnorm_t),
            )

        dk, dv, dbias, dmod, dnorm = carry
        dq_i, dk, dv, dbias, dmod, dnorm = _row_loop(
            plan, i, body, (jnp.zeros(q_i.shape, jnp.float32), dk, dv, dbias, dmod, dnorm), differentiable
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
    dq = jnp.moveaxis(dq, 0, 2).reshape(q.shape)
    cast = lambda g, x: g.astype(x.dtype)
    none = lambda tree: jax.tree.map(lambda _: None, tree)
    d_problem = Problem(problem.dims, problem.scale, none(problem.mask), jax.tree.map(cast, dmod, score_mod),
                        jax.tree.map(cast, dnorm, normalizer), none(problem.dropout), none(problem.shard))
    return (cast(dq, q), cast(dk, k), cast(dv, v), None if bias is None else cast(dbias, bias), d_problem,
            none(plan))


def _values_grad(p, do_i, kv_heads):
    """``P^T dO`` (or ``dS^T Q``) summed over the query heads that share a key head:
    ``[B, K, bk, E]``, float32. ``P^T`` is transposed explicitly (a barrier keeps XLA from folding
    the transpose back into the product): XLA's CPU backend runs a product whose left operand is
    transposed as a slow single-threaded loop, and a copy plus a plain matmul as fast ones."""
    B, H, t, s = p.shape
    pt = lax.optimization_barrier(jnp.swapaxes(p.reshape(B, kv_heads, (H // kv_heads) * t, s), 2, 3))
    dog = do_i.reshape(B, kv_heads, (H // kv_heads) * t, do_i.shape[-1])
    return lax.dot_general(pt, dog, (((3,), (2,)), ((0, 1), (0, 1))), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
