"""Flash attention for TPU (Mosaic), in the design of splash attention.

Same maths as :mod:`kernels_pallas.flash.kernel` (softmax and elementwise normalizers, the
library's masks and score mods evaluated on the tile's indices), laid out for the TPU's pipeline
instead of a GPU's loops (letter legend in :mod:`attnjax.core.tiling`):

* inside the calls the layout is heads-major, ``[B, H, T, D]`` (the wrapper transposes), so every
  block's last two dims are ``(tile, D)``: Mosaic's rule (divisible by ``(8, 128)`` or equal to the
  array's) holds for any head dim, and every tile is a multiple of 128 (the MXU and lane width);
* the key tiles a query tile visits are a grid axis, not a loop: forward and ``dq`` run on grid
  ``(B, H, nq, w)``, where step ``j`` of row ``i`` is the ``j``-th non-empty key tile of the row's
  block map. The compacted lists arrive by scalar prefetch (SMEM) and the K/V index maps read
  them, so Mosaic's pipeline fetches exactly the non-empty tiles, one ahead of the compute; steps
  past a row's count repeat its last tile (no new fetch) and compute nothing;
* ``dk, dv`` run on grid ``(B, K, nk, G * w)``: a key tile visits, for each of the ``G`` query
  heads sharing its key head, the non-empty query tiles of its block-map column, so K/V are never
  repeated and no two programs write one tile;
* running statistics and accumulators live in f32 VMEM scratch across the visit axis; the
  log-sum-exp and ``delta = rowsum(dO * O) - dlse`` travel lane-dense as ``[B, H, 1, T]``
  (``(1, tq)`` blocks, turned into columns by a lane-wide transpose in the kernel): a ``[.., T, 1]``
  f32 array would be padded to 128 lanes in HBM, 512 MiB per head pair at 128K tokens;
* each visit entry is ``2 * tile + full``: FULL tiles take a branch that evaluates no mask,
  PARTIAL ones evaluate ``attnjax.core.tiling.allowed`` on iota indices.
  ``w`` is the longest row when the block map is known at trace time (causal, windows: the grid
  shrinks to the band, as splash's does), else the number of key tiles (traced segment ids).

Arrays of masks and score mods (segment ids, ALiBi slopes) are read through
``attnjax.core.tiling.take`` as everywhere else, but served TPU-style: per-position arrays as
``(tq, 1)`` / ``(1, tk)`` VMEM blocks fetched with the tile (splash's segment-id layout), per-head
or per-batch arrays and scalars from SMEM. A read is answered with the current tile's entries,
so a mask may read the positions of the tile it is asked about, which is what every mask of
the library does.

What this kernel cannot serve raises NotImplementedError while tracing, before any
``pallas_call`` is built (see :func:`flash_attention`), so dispatch falls back to ``xla``.
On CPU it runs under ``pltpu.InterpretParams()`` (TPU semantics), which is what the tests use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnjax.core import tiling
from attnjax.core.blocks import BlockSizes
from attnjax.core.tiling import FULL, Problem
from attnjax.core.utils import round_up

from .. import backend
from .vjp import flash_vjp

LANES = 128
# ---------------------------------------------------------------------------------------------
# Problem arrays: how each leaf of the Problem enters the kernels.


@dataclasses.dataclass(frozen=True)
class _LeafPlan:
    """One array of the problem inside the kernels.

    ``kind``: ``"scalar"`` (a non-indexed scalar, SMEM), ``"smem"`` (an indexed array without
    position axes, flattened into SMEM), ``"q"``/``"kv"`` (one position axis, last: VMEM blocks
    of the tile's entries, reshaped to ``[*prefix, L, 1]`` / ``[*prefix, 1, L]``).
    ``axes`` are the axis kinds of the original array (``INDEXED``), ``shape`` its shape,
    ``dtype`` its dtype (SMEM holds 32-bit copies)."""

    kind: str
    axes: tuple
    shape: tuple[int, ...]
    dtype: np.dtype


def _leaf_axes(problem: Problem):
    """Per leaf: the axis kinds its owner declares in ``INDEXED``, or None for one read whole."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(problem)[0]:
        owner = problem
        for key in path[:-1]:
            owner = getattr(owner, key.name) if hasattr(key, "name") else owner[key.idx]
        axes = getattr(type(owner), "INDEXED", {}).get(getattr(path[-1], "name", None))
        out.append(tuple(axes) if axes is not None and jnp.ndim(leaf) >= 1 else None)
    return out


def _plan_leaf(x, axes) -> _LeafPlan:
    shape, dtype = tuple(jnp.shape(x)), jnp.result_type(x)
    if axes is None:
        if math.prod(shape) != 1:
            raise NotImplementedError(
                f"the TPU flash kernel reads a mask or score mod array of shape {shape} that is not "
                "declared INDEXED (e.g. a relative-position table read by gather)")
        return _LeafPlan("scalar", (), shape, dtype)
    positions = [n for n, kind in enumerate(axes) if kind in ("q", "kv")]
    if not positions:
        return _LeafPlan("smem", axes, shape, dtype)
    if len(positions) > 1 or positions[0] != len(axes) - 1:
        raise NotImplementedError(
            f"the TPU flash kernel reads per-position arrays with one position axis, last; got axes {axes}")
    return _LeafPlan(axes[-1], axes, shape, dtype)


def _smem_dtype(dtype):
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.float32
    if jnp.issubdtype(dtype, jnp.unsignedinteger):
        return jnp.uint32
    return jnp.int32


def _prepare_leaf(x, plan: _LeafPlan, q_len: int, kv_len: int):
    """The array handed to the kernels for a leaf (padded, reshaped, 32-bit)."""
    x = jnp.asarray(x)
    if plan.kind in ("scalar", "smem"):
        return x.reshape(-1).astype(_smem_dtype(plan.dtype))
    length = q_len if plan.kind == "q" else kv_len
    pad = length - x.shape[-1]
    if pad:  # with the last entry: what the predicates' clipping reads
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], mode="edge")
    if jnp.dtype(x.dtype).itemsize < 4 or x.dtype == jnp.bool_:
        x = x.astype(jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32)
    return x[..., :, None] if plan.kind == "q" else x[..., None, :]


class _TileLeaf:
    """A problem array as its owner's code sees it inside a kernel: ``take`` (which indexes
    anything that is not a ``KernelLeaf`` directly) gets the current tile's entries, shaped as
    numpy would shape them, without gathering."""

    def __init__(self, plan: _LeafPlan, ref, b, h):
        self.plan, self.ref, self.b, self.h = plan, ref, b, h
        self.shape, self.ndim = plan.shape, len(plan.shape)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        if len(index) != self.ndim:
            raise NotImplementedError(f"the TPU flash kernel reads arrays with one index per axis; got {index}")
        shape = jnp.broadcast_shapes(*(jnp.shape(i) for i in index if not isinstance(i, int)))
        if self.plan.kind == "q" or self.plan.kind == "kv":
            value = self.ref[...]  # [tq, 1] or [1, tk]
            if math.prod(shape) != value.size:
                raise NotImplementedError("the TPU flash kernel reads per-position arrays at the tile's positions")
            return value.reshape(shape).astype(self.plan.dtype)
        flat = 0
        for n, (kind, size, i) in enumerate(zip(self.plan.axes, self.plan.shape, index)):
            if isinstance(i, int):
                at = i
            elif size == 1:
                at = 0
            elif kind in ("batch", "heads"):
                at = self.b if kind == "batch" else self.h
            else:
                raise NotImplementedError(f"the TPU flash kernel cannot read axis {n} ({kind}) of an SMEM array")
            flat = flat * size + at
        if math.prod(shape) != 1:
            raise NotImplementedError("the TPU flash kernel reads one entry of a per-batch or per-head array")
        value = self.ref[flat].astype(self.plan.dtype)
        return jnp.broadcast_to(value, shape) if shape else value


@dataclasses.dataclass(frozen=True)
class _Static:
    treedef: jax.tree_util.PyTreeDef
    leaves: tuple[_LeafPlan, ...]
    tiles: BlockSizes
    widths: tuple[int, int, int]  # grid width of the visit axis: forward, dq, dkv (per head)
    interpret: object

    @property
    def problem_meta(self) -> Problem:
        return jax.tree.unflatten(self.treedef, [None] * len(self.leaves))

    def problem(self, refs, b, h) -> Problem:
        """The Problem inside a kernel, its arrays served by :class:`_TileLeaf`."""
        leaves = []
        for plan, ref in zip(self.leaves, refs):
            if plan.kind == "scalar":
                value = ref[0].astype(plan.dtype)
                leaves.append(value if plan.shape == () else jnp.broadcast_to(value, plan.shape))
            else:
                leaves.append(_TileLeaf(plan, ref, b, h))
        return jax.tree.unflatten(self.treedef, leaves)

    def leaf_specs(self, coords):
        """BlockSpecs of the problem arrays; ``coords(*grid, *prefetch) -> (b, h, qt, kt)``."""
        specs = []
        for plan in self.leaves:
            if plan.kind in ("scalar", "smem"):
                specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
                continue
            tq, tk = coords.tiles
            prefix = plan.axes[:-1]

            def index_map(*args, plan=plan, prefix=prefix):
                b, h, qt, kt = coords(*args)
                lead = tuple(0 if size == 1 else (b if kind == "batch" else h)
                             for kind, size in zip(prefix, plan.shape))
                return (*lead, qt, 0) if plan.kind == "q" else (*lead, 0, kt)

            block = (None,) * len(prefix) + ((tq, 1) if plan.kind == "q" else (1, tk))
            specs.append(pl.BlockSpec(block, index_map))
        return specs


# ---------------------------------------------------------------------------------------------
# Entry point


def flash_attention(problem: Problem, q, k, v, bias, block_sizes: BlockSizes | None = None):
    """``(out [B, T, H, E], lse [B, T, H])`` like ``attnjax.ops.attention.reference.attention``.

    Raises NotImplementedError at trace time for a dense ``bias``, a sharded problem, gradients
    of score-mod or normalizer parameters, and arrays the kernels cannot read tile by tile.
    """
    backend.require_supported("flash")
    if bias is not None:
        raise NotImplementedError("the TPU flash kernel takes no dense bias (use a score mod)")
    if problem.shard is not None:
        raise NotImplementedError("the TPU flash kernel does not take a Shard yet")
    d = problem.dims
    tiles = tpu_tiles(d.q_len, d.kv_len, block_sizes)
    t_len = round_up(d.q_len, math.lcm(tiles.block_q, tiles.block_q_dq, tiles.block_q_dkv))
    s_len = round_up(d.kv_len, math.lcm(tiles.block_k, tiles.block_k_dq, tiles.block_k_dkv))

    leaves, treedef = jax.tree.flatten(problem)
    plans = tuple(_plan_leaf(x, axes) for x, axes in zip(leaves, _leaf_axes(problem)))
    arrays = tuple(_prepare_leaf(x, p, t_len, s_len) for x, p in zip(leaves, plans))
    tables, widths = _visit_tables(problem, tiles)
    static = _Static(treedef, plans, tiles, widths, backend.tpu_interpret_params())

    heads_major = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    args = (heads_major(q, t_len), heads_major(k, s_len), heads_major(v, s_len), tables, arrays)
    _require_traceable(static, *args)
    out, lse = _flash(static, *args)
    return out[:, :, : d.q_len].transpose(0, 2, 1, 3), lse[:, :, 0, : d.q_len].transpose(0, 2, 1)


def tpu_tiles(q_len: int, kv_len: int, block_sizes: BlockSizes | None) -> BlockSizes:
    """The caller's tiles, else the TPU defaults, clipped to the (128-rounded) lengths. Every
    tile must be a multiple of 128: the key tile is the lane dim of the logits, the query tile
    that of their transpose in the dk/dv kernel."""
    bs = (block_sizes or BlockSizes()).resolve("flash", "tpu")
    q = lambda n: min(n, round_up(q_len, LANES))
    k = lambda n: min(n, round_up(kv_len, LANES))
    tiles = BlockSizes(q(bs.block_q), k(bs.block_k), q(bs.block_q_dq), k(bs.block_k_dq),
                       q(bs.block_q_dkv), k(bs.block_k_dkv), bs.spatial)
    for name in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv"):
        if getattr(tiles, name) % LANES:
            raise NotImplementedError(f"TPU flash tiles must be multiples of {LANES}; got {name}={getattr(tiles, name)}")
    return tiles


def _require_traceable(static, q, k, v, tables, arrays):
    """Traces forward and backward kernels now (no compile), so whatever they cannot read
    declines here, inside dispatch, rather than when the gradient is traced later."""
    def forward_and_backward(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: _flash(static, q, k, v, tables, arrays), q, k, v)
        return out, vjp(out)

    jax.eval_shape(forward_and_backward, q, k, v)


def _visit_tables(problem: Problem, tiles: BlockSizes):
    """Per pass, ``(counts, visits)``: visits ``[rows * w]`` lists each row's non-empty tiles as
    ``2 * tile + full``, the last one repeated past the count. Forward and dq by row, dk/dv by
    column. The block map is computed at trace time when the mask allows (no traced arrays), so
    ``w`` shrinks to the longest row; else ``w`` is the row length."""
    out, widths, maps = [], [], {}
    for (bq, bk), transpose in ((tiles.forward, False), (tiles.dq, False), (tiles.dkv, True)):
        if (bq, bk) not in maps:
            with jax.ensure_compile_time_eval():
                maps[(bq, bk)] = tiling.tile_plan(problem, bq, bk)
        classes = maps[(bq, bk)]
        concrete = not isinstance(classes, jax.core.Tracer)
        with jax.ensure_compile_time_eval() if concrete else contextlib.nullcontext():
            # Transposed inside the compile-time block: a concrete map stays concrete, so the
            # dk/dv grid shrinks too (and its visit table fits SMEM at 64K+ tokens).
            classes = classes.T if transpose else classes
            order, counts = tiling.compact(classes)
            w = max(int(counts.max()), 1) if concrete else classes.shape[1]
            j = jnp.minimum(jnp.arange(w, dtype=jnp.int32)[None, :], jnp.maximum(counts[:, None] - 1, 0))
            tile = jnp.take_along_axis(order[:, :w] if concrete else order, j, axis=1)
            full = jnp.take_along_axis(classes, tile, axis=1) == FULL
            visits = (2 * tile + full.astype(jnp.int32)).reshape(-1)
        out.append((counts.astype(jnp.int32), visits.astype(jnp.int32)))
        widths.append(w)
    return tuple(out), tuple(widths)


# ---------------------------------------------------------------------------------------------
# Tile arithmetic shared by the kernels


def _dot(a, b, dims):
    """A matmul with f32 accumulation; an f32 weight tile meeting a bf16 operand is cast to bf16
    first (as every flash kernel does for ``P V``); f32 operands run at full precision."""
    if a.dtype != b.dtype:
        low = a.dtype if jnp.finfo(a.dtype).bits < jnp.finfo(b.dtype).bits else b.dtype
        a, b = a.astype(low), b.astype(low)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=jnp.float32)


NN, NT = ((1,), (0,)), ((1,), (1,))


def _indices(qt, kt, bq, bk):
    return qt * bq + lax.iota(jnp.int32, bq), kt * bk + lax.iota(jnp.int32, bk)


def _logits(problem, q, k, q_idx, kv_idx, bh, scale):
    """``score_mod(scale * q k^T)`` as ``[1, 1, bq, bk]`` and the mod's vjp."""
    raw = (_dot(q, k, NT) * scale)[None, None]
    return jax.vjp(lambda s: tiling.modify(problem, problem.score_mod, s, q_idx, kv_idx, bh), raw)


def _tile_grads(problem, q, k, v, do, lse, delta, q_idx, kv_idx, bh, masked, scale):
    """``(p, ds)`` of a tile, ``[bq, bk]`` f32: the weights that multiplied V, and the
    gradient of the raw scores ``q k^T`` (before the scale)."""
    s, mod_vjp = _logits(problem, q, k, q_idx, kv_idx, bh, scale)
    ok = tiling.allowed(problem, q_idx, kv_idx, bh) if masked else None
    dp = _dot(do, v, NT)[None, None]
    zs = tiling.dropout_scale(problem, q_idx, kv_idx, bh)
    p, ds, _ = tiling.tile_backward(problem.normalizer, problem.lengths[1], s, ok,
                                    lse[None, None], delta[None, None], dp, zs)
    (ds,) = mod_vjp(ds)
    return p[0, 0], ds[0, 0]


def _col_to_row(x):
    """``[n, 1] -> [1, n]`` through a lane-wide transpose (the XLU's aligned case)."""
    return jnp.broadcast_to(x, (x.shape[0], LANES)).T[:1, :]


def _row_to_col(x):
    """``[1, n] -> [n, 1]``."""
    return jnp.broadcast_to(x, (LANES, x.shape[1])).T[:, :1]


def _visit(visits_ref, at):
    entry = visits_ref[at]
    return entry >> 1, (entry & 1) == 1


def _branches(run, full):
    """Runs ``run(masked)`` once, mask-free on FULL tiles."""
    pl.when(full)(lambda: run(False))
    pl.when(jnp.logical_not(full))(lambda: run(True))


# ---------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(counts_ref, visits_ref, q_ref, k_ref, v_ref, *refs, static: _Static):
    n = len(static.leaves)
    leaf_refs, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = refs[:n], refs[n:]
    b, h, i, j = (pl.program_id(a) for a in range(4))
    bq, bk = static.tiles.forward
    w = static.widths[0]
    meta = static.problem_meta
    row_normalized = meta.normalizer.row_normalized

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    kt, full = _visit(visits_ref, i * w + j)

    def run(masked):
        problem = static.problem(leaf_refs, b, h)
        q_idx, kv_idx = _indices(i, kt, bq, bk)
        k, v = k_ref[...], v_ref[...]
        if masked:  # non-finite keys and values stay in the entries the mask allows
            k, v = tiling.poison_keys(k, v)
        s, _ = _logits(problem, q_ref[...], k, q_idx, kv_idx, (b, h), meta.scale)  # [1, 1, bq, bk]
        ok = tiling.allowed(problem, q_idx, kv_idx, (b, h)) if masked else None
        zs = tiling.dropout_scale(problem, q_idx, kv_idx, (b, h))  # None without dropout
        if row_normalized:
            s = tiling.masked_logits(s, ok, -jnp.inf)[0, 0]  # [bq, bk]
            m_prev = m_ref[...]  # [bq, 1]
            m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
            # Rows that have seen no allowed key keep m = -inf; shifting them by 0 gives exact
            # zeros instead of NaN (-inf - -inf).
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe)
            alpha = jnp.exp(m_prev - m_safe)
            m_ref[...] = m_new
            l_ref[...] = alpha * l_ref[...] + p.sum(axis=-1, keepdims=True)
            # With dropout the row sum counts every weight, the values only the kept ones.
            kept = p if zs is None else p * zs[0, 0]
            acc_ref[...] = alpha * acc_ref[...] + _dot(kept, v, NN)
        else:
            p = tiling.elementwise_weights(problem.normalizer, problem.lengths[1], s, ok, zs)[0, 0]
            acc_ref[...] += _dot(p, v, NN)

    pl.when(j < counts_ref[i])(lambda: _branches(run, full))

    @pl.when(j == w - 1)
    def _finish():
        if row_normalized:
            l, m = l_ref[...], m_ref[...]
            empty = l == 0.0
            o_ref[...] = (acc_ref[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
            lse_ref[...] = _col_to_row(jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l))))
        else:
            o_ref[...] = acc_ref[...].astype(o_ref.dtype)
            lse_ref[...] = jnp.zeros(lse_ref.shape, jnp.float32)


class _Coords:
    """Maps (grid ids, prefetch refs) to ``(b, h, query tile, key tile)`` for leaf index maps."""

    def __init__(self, fn, tiles):
        self.fn, self.tiles = fn, tiles

    def __call__(self, *args):
        return self.fn(*args)


def _row_coords(static, tiles, w):
    def fn(b, h, i, j, counts_ref, visits_ref):
        return b, h, i, visits_ref[i * w + j] >> 1
    return _Coords(fn, tiles)


def _forward(static: _Static, q, k, v, tables, arrays):
    counts, visits = tables[0]
    B, H, Tp, D = q.shape
    K, E = k.shape[1], v.shape[-1]
    bq, bk = static.tiles.forward
    G, w = H // K, static.widths[0]
    kv_map = lambda b, h, i, j, c, vis: (b, h // G, vis[i * w + j] >> 1, 0)
    row_map = lambda b, h, i, j, c, vis: (b, h, i, 0)
    stat_map = lambda b, h, i, j, c, vis: (b, h, 0, i)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, H, Tp // bq, w),
        in_specs=[
            pl.BlockSpec((None, None, bq, D), row_map),
            pl.BlockSpec((None, None, bk, D), kv_map),
            pl.BlockSpec((None, None, bk, E), kv_map),
            *static.leaf_specs(_row_coords(static, (bq, bk), w)),
        ],
        out_specs=[pl.BlockSpec((None, None, bq, E), row_map), pl.BlockSpec((None, None, 1, bq), stat_map)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, E), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, static=static),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, E), q.dtype), jax.ShapeDtypeStruct((B, H, 1, Tp), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=static.interpret,
        name="attnjax_flash_fwd_tpu",
    )(counts, visits, q, k, v, *arrays)


# ---------------------------------------------------------------------------------------------
# Backward


def _dq_kernel(counts_ref, visits_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, static):
    n = len(static.leaves)
    leaf_refs, (dq_ref, acc_ref) = refs[:n], refs[n:]
    b, h, i, j = (pl.program_id(a) for a in range(4))
    bq, bk = static.tiles.dq
    w = static.widths[1]
    scale = static.problem_meta.scale

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    kt, full = _visit(visits_ref, i * w + j)

    def run(masked):
        problem = static.problem(leaf_refs, b, h)
        q_idx, kv_idx = _indices(i, kt, bq, bk)
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        # In a PARTIAL tile non-finite inputs are zeroed, so they stay in the entries the mask allows.
        q, k, v = tiling.zero_non_finite(q, k, v) if masked else (q, k, v)
        lse, delta = _row_to_col(lse_ref[...]), _row_to_col(delta_ref[...])
        _, ds = _tile_grads(problem, q, k, v, do_ref[...], lse, delta, q_idx, kv_idx, (b, h), masked, scale)
        acc_ref[...] += _dot(ds, k, NN) * scale

    pl.when(j < counts_ref[i])(lambda: _branches(run, full))

    @pl.when(j == w - 1)
    def _finish():
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(counts_ref, visits_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, static, groups):
    n = len(static.leaves)
    leaf_refs, (dk_ref, dv_ref, dk_acc, dv_acc) = refs[:n], refs[n:]
    b, kvh, kt, s_ = (pl.program_id(a) for a in range(4))
    bq, bk = static.tiles.dkv
    w = static.widths[2]
    scale = static.problem_meta.scale
    g, j = s_ // w, s_ % w
    h = kvh * groups + g

    @pl.when(s_ == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    qt, full = _visit(visits_ref, kt * w + j)

    def run(masked):
        problem = static.problem(leaf_refs, b, h)
        q_idx, kv_idx = _indices(qt, kt, bq, bk)
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        q, k, v = tiling.zero_non_finite(q, k, v) if masked else (q, k, v)  # as in _dq_kernel
        lse, delta = _row_to_col(lse_ref[...]), _row_to_col(delta_ref[...])
        p, ds = _tile_grads(problem, q, k, v, do, lse, delta, q_idx, kv_idx, (b, h), masked, scale)
        dv_acc[...] += _dot(p.T, do, NN)
        dk_acc[...] += _dot(ds.T, q, NN) * scale

    pl.when(j < counts_ref[kt])(lambda: _branches(run, full))

    @pl.when(s_ == groups * w - 1)
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _backward(static: _Static, q, k, v, tables, arrays, out, lse, d_out, d_lse):
    B, H, Tp, D = q.shape
    K, Sp, E = k.shape[1], k.shape[2], v.shape[-1]
    G = H // K
    f32 = lambda x: x.astype(jnp.float32)
    # delta = rowsum(dO * O) - dlse (softmax's correction term). Padding rows hold garbage:
    # their delta and lse become 0 (their dO is 0). Rows with no key have weights 0 anyway.
    real = (jnp.arange(Tp) < static.problem_meta.dims.q_len)[None, None, None, :]
    delta = jnp.where(real, (f32(d_out) * f32(out)).sum(-1)[:, :, None, :] - d_lse, 0.0)
    lse = jnp.where(real & (lse != -jnp.inf), lse, 0.0)
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

    counts, visits = tables[1]
    bq, bk = static.tiles.dq
    w = static.widths[1]
    kv_map = lambda b, h, i, j, c, vis: (b, h // G, vis[i * w + j] >> 1, 0)
    row_map = lambda b, h, i, j, c, vis: (b, h, i, 0)
    stat_map = lambda b, h, i, j, c, vis: (b, h, 0, i)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, static=static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, H, Tp // bq, w),
            in_specs=[
                pl.BlockSpec((None, None, bq, D), row_map),
                pl.BlockSpec((None, None, bk, D), kv_map),
                pl.BlockSpec((None, None, bk, E), kv_map),
                pl.BlockSpec((None, None, bq, E), row_map),
                pl.BlockSpec((None, None, 1, bq), stat_map),
                pl.BlockSpec((None, None, 1, bq), stat_map),
                *static.leaf_specs(_row_coords(static, (bq, bk), w)),
            ],
            out_specs=pl.BlockSpec((None, None, bq, D), row_map),
            scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=static.interpret,
        name="attnjax_flash_dq_tpu",
    )(counts, visits, q, k, v, d_out, lse, delta, *arrays)

    counts_t, visits_t = tables[2]
    bq, bk = static.tiles.dkv
    w = static.widths[2]
    q_map = lambda b, kvh, kt, s, c, vis: (b, kvh * G + s // w, vis[kt * w + s % w] >> 1, 0)
    col_map = lambda b, kvh, kt, s, c, vis: (b, kvh, kt, 0)
    stat_map = lambda b, kvh, kt, s, c, vis: (b, kvh * G + s // w, 0, vis[kt * w + s % w] >> 1)
    coords = _Coords(lambda b, kvh, kt, s, c, vis: (b, kvh * G + s // w, vis[kt * w + s % w] >> 1, kt), (bq, bk))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, static=static, groups=G),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, K, Sp // bk, G * w),
            in_specs=[
                pl.BlockSpec((None, None, bq, D), q_map),
                pl.BlockSpec((None, None, bk, D), col_map),
                pl.BlockSpec((None, None, bk, E), col_map),
                pl.BlockSpec((None, None, bq, E), q_map),
                pl.BlockSpec((None, None, 1, bq), stat_map),
                pl.BlockSpec((None, None, 1, bq), stat_map),
                *static.leaf_specs(coords),
            ],
            out_specs=[pl.BlockSpec((None, None, bk, D), col_map), pl.BlockSpec((None, None, bk, E), col_map)],
            scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, E), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=static.interpret,
        name="attnjax_flash_dkv_tpu",
    )(counts_t, visits_t, q, k, v, d_out, lse, delta, *arrays)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Differentiation


_flash = flash_vjp(_forward, _backward, "TPU flash kernel")
