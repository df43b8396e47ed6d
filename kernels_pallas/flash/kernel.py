"""Flash attention in Pallas: one tiled template for softmax and elementwise normalizers.

The normalizer is a compile-time choice. Softmax keeps a running max and sum per row and writes
the log-sum-exp; elementwise normalizers (sigmoid, ...) accumulate ``f(S) V`` with no row
statistics, and their backward needs no ``rowsum(dO * O)`` correction (FlashSigmoid).

Kernels (letter legend in :mod:`attnjax.core.tiling`; ``nq``/``nk`` query/key tiles; each pass
has its own tile sizes, ``BlockSizes.forward`` / ``.dq`` / ``.dkv``):

* forward, grid ``(B, H, nq)``: a query tile loops over the key tiles its row of the block map
  marks non-empty (a compacted list, so empty tiles cost nothing), masking only PARTIAL tiles;
* ``dq``, grid ``(B, H, nq)``: the same loop, recomputing each tile's weights from the saved
  log-sum-exp;
* ``dk, dv``, grid ``(B, K, nk)``: a key tile loops over the query tiles of its column of the
  block map, for each of the ``G = H / K`` query heads that share it, so K/V are never repeated
  in memory and no two programs write the same output tile.

The problem (:class:`attnjax.core.Problem`: mask, score mod, normalizer, dropout, shard) is the
library's own pytree: its arrays enter the kernels as whole-array inputs and the same
:mod:`attnjax.core.tiling` functions evaluate it on the tile's indices, so the kernels cannot
disagree with the reference about what a mask means. This one template serves every mask,
neighborhood attention included (``attnjax.ops.neighborhood``'s pallas path feeds it tokens
permuted tile by tile with a :class:`attnjax.masks.TiledNeighborhood` mask).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.core import tiling
from attnjax.core.blocks import BlockSizes
from attnjax.core.tiling import FULL, Problem
from attnjax.core.utils import round_up

from .. import backend
from .vjp import flash_vjp


@dataclasses.dataclass(frozen=True)
class _Static:
    treedef: jax.tree_util.PyTreeDef  # of the Problem (its dims and scale are static in it)
    leaf_shapes: tuple[tuple[int, ...], ...]
    indexed: tuple[bool, ...]  # per leaf: read by tile through tiling.take (see _leaf_layouts)
    tiles: BlockSizes  # resolved: every field an int
    interpret: bool

    @property
    def dims(self):
        return jax.tree.unflatten(self.treedef, [None] * len(self.leaf_shapes)).dims

    @property
    def scale(self) -> float:
        return jax.tree.unflatten(self.treedef, [None] * len(self.leaf_shapes)).scale

    def problem(self, leaf_refs) -> Problem:
        """Rebuilds the Problem inside a kernel: indexed arrays stay in memory as
        :class:`~attnjax.core.tiling.KernelLeaf` (read by tile), the rest are loaded whole."""
        leaves = [tiling.KernelLeaf(ref, shape) if indexed else ref[...].reshape(shape)
                  for ref, shape, indexed in zip(leaf_refs, self.leaf_shapes, self.indexed)]
        return jax.tree.unflatten(self.treedef, leaves)

    def leaf_specs(self, leaves):
        """Indexed arrays stay in memory (a kernel loads a tile's block of them); the others
        (scalars, seeds) are given whole to every program."""
        return [pl.BlockSpec(memory_space=pl.ANY) if indexed else _whole(x)
                for x, indexed in zip(leaves, self.indexed)]


def flash_attention(problem: Problem, q, k, v, bias, block_sizes: BlockSizes | None = None):
    """``(out [B, T, H, E], lse [B, T, H])`` like ``attnjax.ops.attention.reference.attention``.

    Raises NotImplementedError (so dispatch falls back) for an additive ``bias``, on a platform
    the kernels are not validated on, and when score-mod or normalizer parameters need gradients.
    """
    if backend.platform() == "tpu":  # the TPU kernels have their own layout (kernels_pallas/flash/tpu.py)
        from . import tpu

        return tpu.flash_attention(problem, q, k, v, bias, block_sizes)
    if bias is not None:
        raise NotImplementedError("the Pallas flash kernel takes no dense bias (use a score mod)")
    backend.require_supported("flash")
    d = problem.dims
    tiles = backend.flash_tiles(d.q_len, d.kv_len, block_sizes)
    # Each pass has its own tiles; the arrays are padded to a whole number of every pass's tiles.
    t_len = round_up(d.q_len, math.lcm(tiles.block_q, tiles.block_q_dq, tiles.block_q_dkv))
    s_len = round_up(d.kv_len, math.lcm(tiles.block_k, tiles.block_k_dq, tiles.block_k_dkv))
    plans = _plans(problem, tiles)

    d_pad, e_pad = backend.pad_head_dim(d.head_dim) - d.head_dim, backend.pad_head_dim(d.v_dim) - d.v_dim
    pad = lambda x, n, e: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, e)))
    leaves, treedef = jax.tree.flatten(problem)
    layouts = _leaf_layouts(problem)
    # Position axes of indexed arrays are padded with their last entry (what the predicates'
    # clipping reads), so a tile's block load never leaves the array.
    leaves = [x if axes is None else _pad_positions(x, axes, t_len - d.q_len, s_len - d.kv_len)
              for x, axes in zip(leaves, layouts)]
    static = _Static(treedef, tuple(jnp.shape(x) for x in leaves), tuple(a is not None for a in layouts),
                     tiles, backend.interpret())
    args = (pad(q, t_len, d_pad), pad(k, s_len, d_pad), pad(v, s_len, e_pad), plans,
            tuple(jnp.reshape(x, (-1,) if jnp.ndim(x) == 0 else jnp.shape(x)) for x in leaves))
    if not static.interpret:
        backend.require_lowerable("flash", functools.partial(_flash, static), *args)
    out, lse = _flash(static, *args)
    return out[:, : d.q_len, :, : d.v_dim], lse[:, :, : d.q_len].transpose(0, 2, 1)


def _leaf_layouts(problem: Problem):
    """Per leaf of the problem: the axis kinds of an array its owner reads through
    ``tiling.take`` (its class's ``INDEXED``), or None for one read whole."""
    layouts = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(problem)[0]:
        owner = problem
        for key in path[:-1]:
            if isinstance(key, jax.tree_util.GetAttrKey):
                owner = getattr(owner, key.name)
            elif isinstance(key, jax.tree_util.SequenceKey):
                owner = owner[key.idx]
            elif isinstance(key, jax.tree_util.DictKey):
                owner = owner[key.key]
            else:  # a container we do not walk: its leaves are read whole
                owner = None
                break
        axes = getattr(type(owner), "INDEXED", {}).get(getattr(path[-1], "name", None))
        layouts.append(axes if axes is not None and jnp.ndim(leaf) >= 1 else None)
    return layouts


def _pad_positions(x, axes, q_pad: int, kv_pad: int):
    pads = [(0, {"q": q_pad, "kv": kv_pad}.get(kind, 0) if n > 1 else 0) for kind, n in zip(axes, x.shape)]
    return jnp.pad(x, pads, mode="edge") if any(p for _, p in pads) else x


def _plans(problem: Problem, tiles: BlockSizes):
    """The visit lists of each pass: non-empty tiles by row (forward, dq) and by column (dk, dv),
    as ``(classes, order, counts)``; passes with the same tiles share one block map."""
    maps = {}

    def block_map(shape):
        if shape not in maps:
            maps[shape] = tiling.tile_plan(problem, *shape)
        return maps[shape]

    by_row = lambda c: (c.astype(jnp.int32), *tiling.compact(c))
    by_col = lambda c: (c.astype(jnp.int32), *tiling.compact(c.T))
    return by_row(block_map(tiles.forward)), by_row(block_map(tiles.dq)), by_col(block_map(tiles.dkv))


def _whole(x):
    """A BlockSpec giving every program the whole array (block-map tables, mask/mod arrays)."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _dot(a, b, trans_b=False):
    """``a @ b`` (or ``a @ b.T``) with float32 accumulation. A float32 weight tile meeting a
    low-precision operand is cast to that operand's dtype first, as FlashAttention does for
    ``P V``: the tensor cores (and Triton's dot) take one input type, and the rounding of ``P`` to
    bf16 is what every flash kernel accepts (docs/kernels.md quantifies it)."""
    if a.dtype != b.dtype:
        low = a.dtype if jnp.finfo(a.dtype).bits < jnp.finfo(b.dtype).bits else b.dtype
        a, b = a.astype(low), b.astype(low)
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _tile_logits(static, problem, q, k, q_idx, kv_idx, bh):
    """Logits ``[1, 1, bq, bk]`` and the vjp of the score mod with respect to raw scores."""
    raw = (_dot(q, k, trans_b=True) * static.scale)[None, None]
    return jax.vjp(lambda s: tiling.modify(problem, problem.score_mod, s, q_idx, kv_idx, bh), raw)


def _tile_grads(static, problem, q, k, v, do, lse, delta, q_idx, kv_idx, bh, masked):
    """Recomputes a tile for the backward: ``(p [bq, bk], ds [bq, bk])``, where ``p`` are the
    weights that multiplied the values and ``ds`` the gradient of the raw scores ``q k^T``."""
    s, mod_vjp = _tile_logits(static, problem, q, k, q_idx, kv_idx, bh)
    ok = tiling.allowed(problem, q_idx, kv_idx, bh) if masked else None
    dp = _dot(do, v, trans_b=True)[None, None]
    zs = tiling.dropout_scale(problem, q_idx, kv_idx, bh)
    p, ds, _ = tiling.tile_backward(problem.normalizer, problem.lengths[1], s, ok, lse, delta, dp, zs)
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
    bq, bk = static.tiles.forward
    q = q_ref[...]  # [bq, D]
    q_idx = i * bq + lax.iota(jnp.int32, bq)

    def body(kt, masked, carry):
        k = k_ref[pl.ds(kt * bk, bk), :]  # [bk, D]
        v = v_ref[pl.ds(kt * bk, bk), :]  # [bk, E]
        if masked:  # non-finite keys and values stay in the entries the mask allows
            k, v = tiling.poison_keys(k, v)
        kv_idx = kt * bk + lax.iota(jnp.int32, bk)
        s, _ = _tile_logits(static, problem, q, k, q_idx, kv_idx, (b, h))  # [1, 1, bq, bk]
        ok = tiling.allowed(problem, q_idx, kv_idx, (b, h)) if masked else None
        zs = tiling.dropout_scale(problem, q_idx, kv_idx, (b, h))
        pv = lambda p: _dot(p[0, 0], v)[None, None]  # [1, 1, bq, E]
        if normalizer.row_normalized:
            return tiling.softmax_update(carry, tiling.masked_logits(s, ok, -jnp.inf), pv, zs)
        return (carry[0] + pv(tiling.elementwise_weights(normalizer, S, s, ok, zs)),)

    E = o_ref.shape[-1]
    acc0 = jnp.zeros((1, 1, bq, E), jnp.float32)
    visit = lambda init: tiling.visit(counts_ref[i], lambda j: order_ref[i, j],
                                lambda kt: classes_ref[i, kt] == FULL, body, init)
    if normalizer.row_normalized:
        m0 = jnp.full((1, 1, bq), -jnp.inf, jnp.float32)
        out, lse = tiling.softmax_finish(*visit((m0, jnp.zeros((1, 1, bq), jnp.float32), acc0)))
    else:
        (out,) = visit((acc0,))
        lse = jnp.zeros((1, 1, bq), jnp.float32)
    o_ref[...] = out[0, 0].astype(o_ref.dtype)
    lse_ref[...] = lse[0, 0]


def _forward(static: _Static, q, k, v, plans, leaves):
    classes, order, counts = plans[0]
    B, Tp, H, D = q.shape
    Sp, E = k.shape[1], v.shape[-1]
    (bq, _), G = static.tiles.forward, static.dims.groups
    nq = classes.shape[0]
    in_specs = [
        _whole(classes), _whole(order), _whole(counts),
        pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((None, Sp, None, D), lambda b, h, i: (b, 0, h // G, 0)),
        pl.BlockSpec((None, Sp, None, E), lambda b, h, i: (b, 0, h // G, 0)),
        *static.leaf_specs(leaves),
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
        **backend.compiler_params("flash", max(D, E)),
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
    bq, bk = static.tiles.dq
    # Non-finite entries of the program's own inputs are zeroed once, for every tile: a PARTIAL
    # tile needs it (masked entries then contribute exactly nothing), and in a FULL tile it changes
    # only the gradient of a non-finite input itself. A PARTIAL tile zeroes the other inputs too.
    (q,), do = tiling.zero_non_finite(q_ref[...]), do_ref[...]  # [bq, D], [bq, E]
    lse, delta = lse_ref[...][None, None, :, None], delta_ref[...][None, None, :, None]
    q_idx = i * bq + lax.iota(jnp.int32, bq)

    def body(kt, masked, dq):
        k = k_ref[pl.ds(kt * bk, bk), :]
        v = v_ref[pl.ds(kt * bk, bk), :]
        k, v = tiling.zero_non_finite(k, v) if masked else (k, v)
        kv_idx = kt * bk + lax.iota(jnp.int32, bk)
        _, ds = _tile_grads(static, problem, q, k, v, do, lse, delta, q_idx, kv_idx, (b, h), masked)
        return dq + _dot(ds, k) * static.scale

    dq = tiling.visit(counts_ref[i], lambda j: order_ref[i, j], lambda kt: classes_ref[i, kt] == FULL,
                body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(classes_ref, order_t_ref, counts_t_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                *refs, static: _Static):
    n = len(static.leaf_shapes)
    leaf_refs, (dk_ref, dv_ref) = refs[:n], refs[n:]
    b, kvh, kt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    problem = static.problem(leaf_refs)
    (bq, bk), G = static.tiles.dkv, static.dims.groups
    k, v = tiling.zero_non_finite(k_ref[...], v_ref[...])  # [bk, D], [bk, E]; as in _dq_kernel
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
            (q,) = tiling.zero_non_finite(q) if masked else (q,)
            p, ds = _tile_grads(static, problem, q, k, v, do, lse, delta, q_idx, kv_idx, (b, h), masked)
            return dk + _dot(ds.T, q) * static.scale, dv + _dot(p.T, do)

        dk, dv = tiling.visit(counts_t_ref[kt], lambda j: order_t_ref[kt, j],
                        lambda i: classes_ref[i, kt] == FULL, body, (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_kernels(static: _Static, q, k, v, plans, leaves, out, lse, d_out, d_lse):
    B, Tp, H, D = q.shape
    Sp, K, E = k.shape[1], k.shape[2], v.shape[-1]
    G = static.dims.groups
    f32 = lambda x: x.astype(jnp.float32)
    # delta = rowsum(dO * O) - dlse (softmax's correction term), [B, H, Tp]. Padding rows that
    # no forward tile covered hold garbage: their delta and lse become 0 (their dO is 0).
    real = (jnp.arange(Tp) < static.dims.q_len)[None, None, :]
    delta = jnp.where(real, (f32(d_out) * f32(out)).sum(-1).transpose(0, 2, 1) - d_lse, 0.0)
    # Rows with no key: their weights are 0 anyway.
    lse = jnp.where(real & ~jnp.isneginf(lse), lse, 0.0)
    leaf_specs = static.leaf_specs(leaves)
    tables = plans[1]
    bq, _ = static.tiles.dq

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, static=static),
        grid=(B, H, tables[0].shape[0]),
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
        **backend.compiler_params("flash", max(D, E)),
        name="attnjax_flash_dq",
    )(*tables, q, k, v, d_out, lse, delta, *leaves)

    t_tables = plans[2]
    _, bk = static.tiles.dkv
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, static=static),
        grid=(B, K, t_tables[0].shape[1]),
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
        **backend.compiler_params("flash", max(D, E)),
        name="attnjax_flash_dkv",
    )(*t_tables, q, k, v, d_out, lse, delta, *leaves)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Differentiation


_flash = flash_vjp(_forward, _backward_kernels, "Pallas flash kernel")
