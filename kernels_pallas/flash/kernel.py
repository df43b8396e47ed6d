"""Flash attention in Pallas: one tiled template for softmax and elementwise normalizers.

The normalizer is a compile-time choice. Softmax keeps a running max and sum per row and writes
the log-sum-exp; elementwise normalizers (sigmoid, ...) accumulate ``f(S) V`` with no row
statistics, and their backward needs no ``rowsum(dO * O)`` correction (FlashSigmoid).

Kernels (letter legend in :mod:`attnjax.ops._common`; ``nq``/``nk`` query/key tiles):

* forward, grid ``(B, H, nq)``: a query tile loops over the key tiles its row of the block map
  marks non-empty (a compacted list, so empty tiles cost nothing), masking only PARTIAL tiles;
* ``dq``, grid ``(B, H, nq)``: the same loop, recomputing each tile's weights from the saved
  log-sum-exp;
* ``dk, dv``, grid ``(B, K, nk)``: a key tile loops over the query tiles of its column of the
  block map, for each of the ``G = H / K`` query heads that share it, so K/V are never repeated
  in memory and no two programs write the same output tile.

Masks, score mods and normalizers are the library's own pytrees: their arrays enter the kernels
as whole-array inputs and the same ``attnjax.ops._common`` functions evaluate them on the tile's
indices, so the kernels cannot disagree with the reference about what a mask means.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.masks import FULL
from attnjax.ops import _common
from attnjax.ops._common import Problem
from kernels_pallas import backend


@dataclasses.dataclass(frozen=True)
class _Static(_common.Tiling):
    treedef: jax.tree_util.PyTreeDef  # of (mask, score_mod, normalizer, dropout, shard)
    leaf_shapes: tuple[tuple[int, ...], ...]
    interpret: bool

    def problem(self, leaf_refs) -> Problem:
        """Rebuilds the Problem inside a kernel from its whole-array leaf inputs."""
        leaves = [ref[...].reshape(shape) for ref, shape in zip(leaf_refs, self.leaf_shapes)]
        return Problem(self.dims, self.scale, *jax.tree.unflatten(self.treedef, leaves))


def flash_attention(problem: Problem, q, k, v, bias, block_sizes=None):
    """``(out [B, T, H, E], lse [B, T, H])`` like ``attnjax.ops.reference.attention``.

    Raises NotImplementedError (so dispatch falls back) for an additive ``bias`` and when
    score-mod or normalizer parameters need gradients.
    """
    if bias is not None:
        raise NotImplementedError("the Pallas flash kernel takes no dense bias (use a score mod)")
    if not backend.supports_flash():
        raise NotImplementedError(f"the Pallas flash kernel is not validated on {backend.platform()}")
    d = problem.dims
    bq, bk = backend.flash_block_sizes(d.q_len, d.kv_len, block_sizes)
    classes, t_pad, s_pad = _common.tile_plan(problem, bq, bk)
    # Non-empty tiles by row (forward, dq) and by column (dk, dv).
    plan = (classes.astype(jnp.int32), *_common.compact(classes), *_common.compact(classes.T))

    d_pad, e_pad = backend.pad_head_dim(d.head_dim) - d.head_dim, backend.pad_head_dim(d.v_dim) - d.v_dim
    pad = lambda x, n, e: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, e)))
    leaves, treedef = jax.tree.flatten(
        (problem.mask, problem.score_mod, problem.normalizer, problem.dropout, problem.shard))
    static = _Static(d, problem.scale, bq, bk, treedef, tuple(jnp.shape(x) for x in leaves),
                     backend.interpret())
    out, lse = _flash(static, pad(q, t_pad, d_pad), pad(k, s_pad, d_pad), pad(v, s_pad, e_pad), plan,
                      tuple(jnp.reshape(x, (-1,) if jnp.ndim(x) == 0 else jnp.shape(x)) for x in leaves))
    return out[:, : d.q_len, :, : d.v_dim], lse[:, :, : d.q_len].transpose(0, 2, 1)


def _whole(x):
    """A BlockSpec giving every program the whole array (block-map tables, mask/mod arrays)."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _visit(count, tile_of, is_full, body, init):
    """``body(tile, masked, carry)`` over ``count`` listed tiles, mask-free on FULL ones."""
    def step(j, carry):
        t = tile_of(j)
        return lax.cond(is_full(t), functools.partial(body, t, False), functools.partial(body, t, True), carry)

    return lax.fori_loop(0, count, step, init)


def _dot(a, b, trans_b=False):
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _tile_logits(static, problem, q, k, q_idx, kv_idx, bh):
    """Logits ``[1, 1, bq, bk]`` and the vjp of the score mod with respect to raw scores."""
    raw = (_dot(q, k, trans_b=True) * static.scale)[None, None]
    return jax.vjp(lambda s: _common.modify(problem, problem.score_mod, s, q_idx, kv_idx, bh), raw)


def _tile_grads(static, problem, q, k, v, do, lse, delta, q_idx, kv_idx, bh, masked):
    """Recomputes a tile for the backward: ``(p [bq, bk], ds [bq, bk])``, where ``p`` are the
    weights that multiplied the values and ``ds`` the gradient of the raw scores ``q k^T``."""
    s, mod_vjp = _tile_logits(static, problem, q, k, q_idx, kv_idx, bh)
    ok = _common.allowed(problem, q_idx, kv_idx, bh) if masked else None
    dp = _dot(do, v, trans_b=True)[None, None]
    zs = _common.dropout_scale(problem, q_idx, kv_idx, bh)
    p, ds, _ = _common.tile_backward(problem.normalizer, problem.lengths[1], s, ok, lse, delta, dp, zs)
    (ds_raw,) = mod_vjp(ds)
    return p[0, 0], ds_raw[0, 0]


# ---------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(classes_ref, order_ref, counts_ref, q_ref, k_ref, v_ref, *refs, static: _Static):
    n = len(static.leaf_shapes)
    leaf_refs, (o_ref, lse_ref) = refs[:n], refs[n:]
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    problem = static.problem(leaf_refs)
    normalizer, S = problem.normalizer, problem.lengths[1]
    bq, bk = static.block_q, static.block_k
    q = q_ref[...]  # [bq, D]
    q_idx = i * bq + lax.iota(jnp.int32, bq)

    def body(kt, masked, carry):
        k = k_ref[pl.ds(kt * bk, bk), :]  # [bk, D]
        v = v_ref[pl.ds(kt * bk, bk), :]  # [bk, E]
        kv_idx = kt * bk + lax.iota(jnp.int32, bk)
        s, _ = _tile_logits(static, problem, q, k, q_idx, kv_idx, (b, h))  # [1, 1, bq, bk]
        ok = _common.allowed(problem, q_idx, kv_idx, (b, h)) if masked else None
        zs = _common.dropout_scale(problem, q_idx, kv_idx, (b, h))
        pv = lambda p: _dot(p[0, 0], v)[None, None]  # [1, 1, bq, E]
        if normalizer.row_normalized:
            return _common.softmax_update(carry, _common.masked_logits(s, ok, -jnp.inf), pv, zs)
        return (carry[0] + pv(_common.elementwise_weights(normalizer, S, s, ok, zs)),)

    E = o_ref.shape[-1]
    acc0 = jnp.zeros((1, 1, bq, E), jnp.float32)
    visit = lambda init: _visit(counts_ref[i], lambda j: order_ref[i, j],
                                lambda kt: classes_ref[i, kt] == FULL, body, init)
    if normalizer.row_normalized:
        m0 = jnp.full((1, 1, bq), -jnp.inf, jnp.float32)
        out, lse = _common.softmax_finish(*visit((m0, jnp.zeros((1, 1, bq), jnp.float32), acc0)))
    else:
        (out,) = visit((acc0,))
        lse = jnp.zeros((1, 1, bq), jnp.float32)
    o_ref[...] = out[0, 0].astype(o_ref.dtype)
    lse_ref[...] = lse[0, 0]


def _forward(static: _Static, q, k, v, plan, leaves):
    classes, order, counts, _, _ = plan
    d = static.dims
    B, Tp, H, D = q.shape
    Sp, E = k.shape[1], v.shape[-1]
    bq, bk, G = static.block_q, static.block_k, d.groups
    nq = Tp // bq
    in_specs = [
        _whole(classes), _whole(order), _whole(counts),
        pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((None, Sp, None, D), lambda b, h, i: (b, 0, h // G, 0)),
        pl.BlockSpec((None, Sp, None, E), lambda b, h, i: (b, 0, h // G, 0)),
        *(_whole(x) for x in leaves),
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, E), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
    ]
    out_shape = [jax.ShapeDtypeStruct((B, Tp, H, E), q.dtype), jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, static=static),
        grid=(B, H, nq),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=static.interpret,
        name="attnjax_flash_fwd",
    )(classes, order, counts, q, k, v, *leaves)


# ---------------------------------------------------------------------------------------------
# Backward


def _dq_kernel(classes_ref, order_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               *refs, static: _Static):
    n = len(static.leaf_shapes)
    leaf_refs, (dq_ref,) = refs[:n], refs[n:]
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    problem = static.problem(leaf_refs)
    bq, bk = static.block_q, static.block_k
    q, do = q_ref[...], do_ref[...]  # [bq, D], [bq, E]
    lse, delta = lse_ref[...][None, None, :, None], delta_ref[...][None, None, :, None]
    q_idx = i * bq + lax.iota(jnp.int32, bq)

    def body(kt, masked, dq):
        k = k_ref[pl.ds(kt * bk, bk), :]
        v = v_ref[pl.ds(kt * bk, bk), :]
        kv_idx = kt * bk + lax.iota(jnp.int32, bk)
        _, ds = _tile_grads(static, problem, q, k, v, do, lse, delta, q_idx, kv_idx, (b, h), masked)
        return dq + _dot(ds, k) * static.scale

    dq = _visit(counts_ref[i], lambda j: order_ref[i, j], lambda kt: classes_ref[i, kt] == FULL,
                body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(classes_ref, order_t_ref, counts_t_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                *refs, static: _Static):
    n = len(static.leaf_shapes)
    leaf_refs, (dk_ref, dv_ref) = refs[:n], refs[n:]
    b, kvh, kt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    problem = static.problem(leaf_refs)
    bq, bk, G = static.block_q, static.block_k, static.dims.groups
    k, v = k_ref[...], v_ref[...]  # [bk, D], [bk, E]
    kv_idx = kt * bk + lax.iota(jnp.int32, bk)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(G):  # the query heads sharing this key head (G is static and small)
        h = kvh * G + g

        def body(i, masked, carry, g=g, h=h):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]  # [bq, D], [bq, E]
            lse = lse_ref[g, rows][None, None, :, None]
            delta = delta_ref[g, rows][None, None, :, None]
            q_idx = i * bq + lax.iota(jnp.int32, bq)
            p, ds = _tile_grads(static, problem, q, k, v, do, lse, delta, q_idx, kv_idx, (b, h), masked)
            return dk + _dot(ds.T, q) * static.scale, dv + _dot(p.T, do)

        dk, dv = _visit(counts_t_ref[kt], lambda j: order_t_ref[kt, j],
                        lambda i: classes_ref[i, kt] == FULL, body, (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_kernels(static: _Static, q, k, v, plan, leaves, out, lse, d_out, d_lse):
    classes, order, counts, order_t, counts_t = plan
    d = static.dims
    B, Tp, H, D = q.shape
    Sp, K, E = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk, G = static.block_q, static.block_k, d.groups
    f32 = lambda x: x.astype(jnp.float32)
    # delta = rowsum(dO * O) - dlse (softmax's correction term), [B, H, Tp].
    delta = (f32(d_out) * f32(out)).sum(-1).transpose(0, 2, 1) - d_lse
    lse = jnp.where(jnp.isneginf(lse), 0.0, lse)  # rows with no key: their weights are 0 anyway
    leaf_specs = [_whole(x) for x in leaves]
    tables = (classes, order, counts)

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, static=static),
        grid=(B, H, Tp // bq),
        in_specs=[
            *(_whole(x) for x in tables),
            pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, Sp, None, D), lambda b, h, i: (b, 0, h // G, 0)),
            pl.BlockSpec((None, Sp, None, E), lambda b, h, i: (b, 0, h // G, 0)),
            pl.BlockSpec((None, bq, None, E), lambda b, h, i: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
            pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
            *leaf_specs,
        ],
        out_specs=pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=static.interpret,
        name="attnjax_flash_dq",
    )(*tables, q, k, v, d_out, lse, delta, *leaves)

    t_tables = (classes, order_t, counts_t)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, static=static),
        grid=(B, K, Sp // bk),
        in_specs=[
            *(_whole(x) for x in t_tables),
            pl.BlockSpec((None, Tp, G, D), lambda b, kvh, j: (b, 0, kvh, 0)),
            pl.BlockSpec((None, bk, None, D), lambda b, kvh, j: (b, j, kvh, 0)),
            pl.BlockSpec((None, bk, None, E), lambda b, kvh, j: (b, j, kvh, 0)),
            pl.BlockSpec((None, Tp, G, E), lambda b, kvh, j: (b, 0, kvh, 0)),
            pl.BlockSpec((None, G, Tp), lambda b, kvh, j: (b, kvh, 0)),
            pl.BlockSpec((None, G, Tp), lambda b, kvh, j: (b, kvh, 0)),
            *leaf_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, D), lambda b, kvh, j: (b, j, kvh, 0)),
            pl.BlockSpec((None, bk, None, E), lambda b, kvh, j: (b, j, kvh, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=static.interpret,
        name="attnjax_flash_dkv",
    )(*t_tables, q, k, v, d_out, lse, delta, *leaves)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Differentiation


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q, k, v, plan, leaves):
    return _forward(static, q, k, v, plan, leaves)


def _flash_fwd(static, q, k, v, plan, leaves):
    # symbolic_zeros=True wraps each argument leaf, telling which ones are differentiated.
    if any(x.perturbed for x in jax.tree.leaves(leaves, is_leaf=_is_primal)):
        raise NotImplementedError(
            "the Pallas flash kernel does not differentiate score-mod or normalizer parameters"
        )
    value = lambda tree: jax.tree.map(lambda x: x.value, tree, is_leaf=_is_primal)
    q, k, v, plan, leaves = value((q, k, v, plan, leaves))
    out, lse = _forward(static, q, k, v, plan, leaves)
    return (out, lse), (q, k, v, plan, leaves, out, lse)


def _flash_bwd(static, res, cotangents):
    q, k, v, plan, leaves, out, lse = res
    d_out, d_lse = cotangents
    d_out = jnp.zeros_like(out) if _is_zero(d_out) else d_out
    d_lse = jnp.zeros_like(lse) if _is_zero(d_lse) else d_lse
    dq, dk, dv = _backward_kernels(static, q, k, v, plan, leaves, out, lse, d_out, d_lse)
    none = lambda tree: jax.tree.map(lambda _: None, tree)
    return dq, dk, dv, none(plan), none(leaves)


def _is_primal(x) -> bool:
    return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


def _is_zero(x) -> bool:
    return isinstance(x, jax.custom_derivatives.SymbolicZero)


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)
