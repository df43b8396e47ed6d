"""Neighborhood attention masks (NATTEN semantics) over flattened multi-dimensional positions.

Neighborhood attention ("Neighborhood Attention Transformer", Hassani et al. 2023; "Faster
Neighborhood Attention", 2024; "Generalized Neighborhood Attention", 2025) lets a query at
coordinates ``(x_0, ..., x_{r-1})`` of a ``spatial_shape`` grid attend to a window of
``kernel_size`` keys along every axis. Per axis, with extent ``n``, kernel ``k``, dilation ``d``,
stride ``s``:

* **dilation groups**: the axis splits into ``d`` interleaved groups (``x mod d``); a query only
  sees keys of its own group. Inside group ``g`` positions are ``t = x // d``, and the group has
  ``n_g = ceil((n - g) / d)`` of them. Everything below is in group coordinates.
* **stride** (GNA): queries form runs of ``s`` (``t // s``); every query in a run uses the window
  of the run's *leader*: the centre ``(t // s) * s + s // 2`` (the right one of two centres for even
  ``s``) or, causal, the last ``(t // s) * s + s - 1``, capped at ``n_g - 1``.
* **non-causal**: the window is ``[c - k//2, c + k//2 + k%2 - 1]`` around the leader ``c``,
  **clamped** (shifted, not truncated) into ``[0, n_g)``: every query sees exactly ``k`` keys, so
  ``k * d <= n`` is required.
* **causal**: keys at or before the query (``u <= t``) and within ``k`` of the leader
  (``u > leader - k``): at most ``k`` keys.
* axes combine with AND.

Picture: 1-D, ``n = 8``, ``k = 3`` (rows are queries, ``#`` an attended key)::

    q0 ###.....     the window is clamped at the borders,
    q1 ###.....     so q0 and q1 see the same 3 keys
    q2 .###....
    ...
    q7 .....###

Block maps are exact: a tile of flattened positions is a union of at most ``2**r - 1`` boxes
(a partial first row, full rows, a partial last row, recursively), the mask of a box pair is a
product of per-axis masks, and per axis the window ends are non-decreasing in the query, so
"some pair allowed" and "all pairs allowed" follow from the box corners (per dilation group).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from attnjax.core.pytree import pytree_dataclass
from attnjax.masks.base import Mask, Tiles, evaluate_bounds  # noqa: F401  (Tiles: the bounds() contract)


@dataclasses.dataclass(frozen=True)
class AxisWindow:
    """The window rule of one spatial axis. Methods take ``xp`` (``numpy`` or ``jax.numpy``) so
    the same formula builds traced masks and static (trace-time) tables."""

    extent: int
    kernel: int
    dilation: int = 1
    stride: int = 1
    causal: bool = False

    def group_len(self, g, xp=jnp):
        """Number of positions in dilation group ``g``: ``ceil((n - g) / d)``."""
        return (self.extent - g + self.dilation - 1) // self.dilation

    def window(self, t, n_g, xp=jnp):
        """Inclusive key range ``(lo, hi)``, in group coordinates, of the query at group
        coordinate ``t`` of a group with ``n_g`` positions."""
        k, s = self.kernel, self.stride
        if self.causal:
            leader = xp.minimum((t // s) * s + s - 1, n_g - 1)
            return xp.maximum(leader - k + 1, 0), t
        leader = xp.minimum((t // s) * s + s // 2, n_g - 1)
        start = xp.clip(leader - k // 2, 0, n_g - k)
        return start, start + k - 1

    def allowed(self, i, j, xp=jnp):
        """Whether query coordinate ``i`` sees key coordinate ``j`` (broadcasting arrays)."""
        d = self.dilation
        g, t, u = i % d, i // d, j // d
        lo, hi = self.window(t, self.group_len(g, xp), xp)
        return (j % d == g) & (u >= lo) & (u <= hi)

    def may_any(self, qa, qb, ka, kb, xp=jnp):
        """Whether some query in ``[qa, qb]`` sees some key in ``[ka, kb]`` (exact).

        In a group, ``lo`` and ``hi`` are non-decreasing in ``t`` and consecutive windows touch or
        overlap (a run of ``s <= k`` moves the window by at most ``k``), so the keys seen by a query
        range are ``[lo(first), hi(last)]``.
        """
        d = self.dilation
        out = None
        for g in range(d):
            n_g = self.group_len(g, xp)
            # Group coordinates of the interval's members of group g (empty if first > last).
            q0, q1 = (qa - g + d - 1) // d, (qb - g) // d
            k0, k1 = (ka - g + d - 1) // d, (kb - g) // d
            lo, _ = self.window(q0, n_g, xp)
            _, hi = self.window(q1, n_g, xp)
            hit = (q0 <= q1) & (k0 <= k1) & (lo <= k1) & (hi >= k0)
            out = hit if out is None else out | hit
        return out

    def must_all(self, qa, qb, ka, kb, xp=jnp):
        """Whether every query in ``[qa, qb]`` sees every key in ``[ka, kb]`` (exact)."""
        if self.dilation > 1:
            # Two distinct positions lie in different groups, and no key is in two groups.
            return (qa == qb) & (ka == kb) & self.allowed(qa, ka, xp)
        _, hi_first = self.window(qa, self.extent, xp)
        lo_last, _ = self.window(qb, self.extent, xp)
        return (lo_last <= ka) & (hi_first >= kb)


def unravel(idx, shape: Sequence[int]):
    """Row-major coordinates of flattened positions ``idx``."""
    coords = []
    for n in reversed(shape[1:]):
        coords.append(idx % n)
        idx = idx // n
    coords.append(idx)
    return tuple(reversed(coords))


def _boxes(a, b, shape, xp=jnp):
    """Splits the flattened ranges ``[a, b]`` (broadcasting arrays, ``a <= b``) into boxes.

    Returns ``[(valid, lo_coords, hi_coords)]``, ``2**r - 1`` entries for rank ``r``; boxes with
    ``valid`` false are absent for that range.
    """
    if len(shape) == 1:
        return [(xp.ones(xp.broadcast_shapes(xp.shape(a), xp.shape(b)), bool), (a,), (b,))]
    row = math.prod(shape[1:])
    ra, rb, xa, xb = a // row, b // row, a % row, b % row
    same = ra == rb
    head = _boxes(xa, xp.where(same, xb, row - 1), shape[1:], xp)
    tail = _boxes(xp.zeros_like(xb), xb, shape[1:], xp)
    first = tuple(0 for _ in shape[1:])
    last = tuple(n - 1 for n in shape[1:])
    out = [(v, (ra, *lo), (ra, *hi)) for v, lo, hi in head]
    out.append((ra + 1 <= rb - 1, (ra + 1, *first), (rb - 1, *last)))
    out += [(v & ~same, (rb, *lo), (rb, *hi)) for v, lo, hi in tail]
    return out


@pytree_dataclass(meta=("axes",))
class Neighborhood(Mask):
    """Neighborhood attention over the row-major flattening of a spatial grid (self attention)."""

    axes: tuple[AxisWindow, ...]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(a.extent for a in self.axes)

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        shape = self.spatial_shape
        out = None
        for ax, i, j in zip(self.axes, unravel(q_idx, shape), unravel(kv_idx, shape)):
            ok = ax.allowed(i, j)
            out = ok if out is None else out & ok
        return out

    def bounds(self, tiles: Tiles, batch: int):
        # Everything here is static (shapes, kernel sizes), so the classification is computed with
        # numpy at trace time from the tiles' sizes: no traced work, whatever the caller's jit. A
        # window (a shard, at traced offsets) is evaluated entry by entry instead.
        if tiles.window:
            return evaluate_bounds(self, tiles, batch)
        shape = self.spatial_shape
        t = tiles
        nq, nk = -(-t.q_len // t.block_q), -(-t.kv_len // t.block_k)
        q_lo = np.arange(nq)[:, None] * t.block_q
        kv_lo = np.arange(nk)[None, :] * t.block_k
        q_hi, kv_hi = np.minimum(q_lo + t.block_q, t.q_len) - 1, np.minimum(kv_lo + t.block_k, t.kv_len) - 1
        q_boxes = _boxes(q_lo, q_hi, shape, np)
        kv_boxes = _boxes(kv_lo, kv_hi, shape, np)
        may_any, must_all = np.zeros((nq, nk), bool), np.ones((nq, nk), bool)
        for qv, q_lo_c, q_hi_c in q_boxes:
            for kv, k_lo_c, k_hi_c in kv_boxes:
                both = qv & kv
                if not both.any():
                    continue
                any_, all_ = both, both
                for ax, qa, qb, ka, kb in zip(self.axes, q_lo_c, q_hi_c, k_lo_c, k_hi_c):
                    any_ = any_ & ax.may_any(qa, qb, ka, kb, np)
                    all_ = all_ & ax.must_all(qa, qb, ka, kb, np)
                may_any |= any_
                must_all &= ~both | all_
        return jnp.asarray(may_any)[None, None], jnp.asarray(must_all)[None, None]

    def check(self, batch, heads, q_len, kv_len):
        n = math.prod(self.spatial_shape)
        if q_len != n or kv_len != n:
            raise ValueError(
                f"the neighborhood mask over spatial_shape={self.spatial_shape} needs q_len == kv_len == "
                f"{n}; got q_len={q_len}, kv_len={kv_len}"
            )


# --------------------------------------------------------------------------------------------
# Argument handling (shared with attnjax.ops.neighborhood_attention)


def _per_axis(name: str, value, rank: int, kind=int) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(f"{name} must be one {kind.__name__} or a tuple of {rank} "
                             f"(one per spatial axis); got {tuple(value)!r}")
        values = tuple(value)
    else:
        values = (value,) * rank
    out = []
    for x in values:
        if kind is bool:
            if not isinstance(x, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool or a tuple of {rank} bools; got {value!r}")
            out.append(bool(x))
            continue
        try:
            if isinstance(x, (bool, np.bool_)):
                raise TypeError
            x = operator.index(x)
        except TypeError:
            raise TypeError(f"{name} must be an int or a tuple of {rank} ints; got {value!r}") from None
        if x < 1:
            raise ValueError(f"{name} must be >= 1 on every axis; got {value!r}")
        out.append(x)
    return tuple(out)


def axis_windows(spatial_shape, kernel_size, dilation=1, stride=1, is_causal=False) -> tuple[AxisWindow, ...]:
    """Validates neighborhood arguments; returns one :class:`AxisWindow` per spatial axis."""
    if not isinstance(spatial_shape, (tuple, list)) or not 1 <= len(spatial_shape) <= 3:
        raise ValueError(f"spatial_shape must be a tuple of 1 to 3 extents; got {spatial_shape!r}")
    rank = len(spatial_shape)
    shape = _per_axis("spatial_shape", tuple(spatial_shape), rank)
    kernel = _per_axis("kernel_size", kernel_size, rank)
    dil = _per_axis("dilation", dilation, rank)
    strd = _per_axis("stride", stride, rank)
    causal = _per_axis("is_causal", is_causal, rank, bool)
    for a, (n, k, d, s) in enumerate(zip(shape, kernel, dil, strd)):
        if k * d > n:
            raise ValueError(
                f"kernel_size[{a}]={k} with dilation[{a}]={d} needs spatial extent >= {k * d} on axis {a}; "
                f"got extent {n} (spatial_shape={shape})"
            )
        if s > k:
            raise ValueError(f"stride[{a}]={s} must be <= kernel_size[{a}]={k}")
    return tuple(AxisWindow(*args) for args in zip(shape, kernel, dil, strd, causal))


def neighborhood(
    spatial_shape: Sequence[int],
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    stride: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
) -> Mask:
    """Neighborhood attention mask (NATTEN semantics) over row-major flattened positions.

    ``spatial_shape`` has 1 to 3 extents; ``kernel_size``, ``dilation``, ``stride`` and
    ``is_causal`` are one value or one per axis. Requires ``kernel_size * dilation <= extent`` and
    ``1 <= stride <= kernel_size`` per axis. Self attention only (``T == S == prod(spatial_shape)``).
    See :mod:`attnjax.masks.neighborhood` for the exact rule.

    >>> from attnjax import masks
    >>> m = masks.neighborhood((6,), 3)
    >>> m.materialize(6, 6)[0, 0].astype(int)
    Array([[1, 1, 1, 0, 0, 0],
           [1, 1, 1, 0, 0, 0],
           [0, 1, 1, 1, 0, 0],
           [0, 0, 1, 1, 1, 0],
           [0, 0, 0, 1, 1, 1],
           [0, 0, 0, 1, 1, 1]], dtype=int32)
    """
    return Neighborhood(axis_windows(spatial_shape, kernel_size, dilation, stride, is_causal))


@pytree_dataclass(meta=("axes", "tile"))
class TiledNeighborhood(Mask):
    """:class:`Neighborhood` on tokens reordered tile by tile ("token permutation", as in NATTEN's
    fused kernels), so that a run of ``prod(tile)`` flat positions is one multi-dimensional tile.

    Each axis is padded to a multiple of its tile; flat position ``p`` is tile ``p // prod(tile)``
    (row-major over the tile grid) at offset ``p % prod(tile)`` (row-major inside the tile). Padded
    positions are never attended (and padded queries attend to nothing). With blocks of exactly
    ``prod(tile)`` positions a block is one box, so block maps are exact and strided windows aligned
    with the tiles are fully block-sparse (only EMPTY and FULL tiles).
    """

    axes: tuple[AxisWindow, ...]
    tile: tuple[int, ...]

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-a.extent // t) for a, t in zip(self.axes, self.tile))

    @property
    def length(self) -> int:
        return math.prod(self.grid) * math.prod(self.tile)

    def coords(self, idx):
        vol = math.prod(self.tile)
        tiles, offsets = unravel(idx // vol, self.grid), unravel(idx % vol, self.tile)
        return tuple(c * t + o for c, t, o in zip(tiles, self.tile, offsets))

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        out = None
        for ax, i, j in zip(self.axes, self.coords(q_idx), self.coords(kv_idx)):
            ok = (i < ax.extent) & (j < ax.extent) & ax.allowed(i, j)
            out = ok if out is None else out & ok
        return out

    def bounds(self, tiles: Tiles, batch: int):
        if tiles.window:
            return evaluate_bounds(self, tiles, batch)
        vol = math.prod(self.tile)
        nq, nk = -(-tiles.q_len // tiles.block_q), -(-tiles.kv_len // tiles.block_k)
        if tiles.block_q != vol or tiles.block_k != vol:
            # Blocks that are not tiles: every tile may be partial (correct, no skipping).
            return np.ones((1, 1, nq, nk), bool), np.zeros((1, 1, nq, nk), bool)
        q_tiles = unravel(np.arange(nq)[:, None], self.grid)
        kv_tiles = unravel(np.arange(nk)[None, :], self.grid)
        may_any, must_all = True, True
        for ax, t, cq, ck in zip(self.axes, self.tile, q_tiles, kv_tiles):
            qa, qb = cq * t, np.minimum(cq * t + t, ax.extent) - 1
            ka, kb = ck * t, np.minimum(ck * t + t, ax.extent) - 1
            may_any = may_any & ax.may_any(qa, qb, ka, kb, np)
            # Padded positions are never allowed, so a tile that sticks out is never FULL.
            inside = (cq * t + t <= ax.extent) & (ck * t + t <= ax.extent)
            must_all = must_all & ax.must_all(qa, qb, ka, kb, np) & inside
        return jnp.asarray(may_any)[None, None], jnp.asarray(must_all)[None, None]

    def check(self, batch, heads, q_len, kv_len):
        if q_len != self.length or kv_len != self.length:
            raise ValueError(f"the tiled neighborhood mask needs q_len == kv_len == {self.length}; "
                             f"got q_len={q_len}, kv_len={kv_len}")
