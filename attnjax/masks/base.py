"""The mask contract, its algebra and block maps; each mask family has its own module beside
this one, and :mod:`attnjax.masks` gathers them.

A block map is conservative: a tile may be called ``PARTIAL`` when it is in fact empty or full
(only costing speed), but never ``EMPTY`` or ``FULL`` wrongly. The classification is computed
from the mask's formula on each tile's index bounds, so it is cheap at a million tokens and works
under ``jit`` with traced segment ids.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int8

from attnjax import _checks
from attnjax.core.pytree import pytree_dataclass
from attnjax.core.tiling import EMPTY, FULL, PARTIAL, collapse  # noqa: F401  (re-exported by masks)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Inclusive index bounds of every tile, shaped to broadcast as ``[B, H, nq, nk]``.

    ``q_lo``/``q_hi`` are ``[1, 1, nq, 1]``, ``kv_lo``/``kv_hi`` are ``[1, 1, 1, nk]``; the last
    tile of each axis is clipped to the sequence, so bounds are always valid positions.

    ``q_len``/``kv_len`` are the lengths of the whole problem. A *window* tiles only a piece of
    it (one shard's queries against one shard's keys, see :class:`attnjax.ops.Shard`): its
    bounds are still positions in the whole problem, starting at the (possibly traced) offsets.
    """

    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    q_lo: Array
    q_hi: Array
    kv_lo: Array
    kv_hi: Array
    window: bool = False

    @classmethod
    def make(cls, q_len: int, kv_len: int, block_q: int, block_k: int, window=None) -> "Tiles":
        """Tiles of the whole ``[q_len, kv_len]`` problem, or of the piece
        ``window = (q_start, q_count, kv_start, kv_count)`` of it."""
        q_start, q_count, kv_start, kv_count = window or (0, q_len, 0, kv_len)
        nq, nk = -(-q_count // block_q), -(-kv_count // block_k)
        q_lo = q_start + jnp.arange(nq, dtype=jnp.int32) * block_q
        kv_lo = kv_start + jnp.arange(nk, dtype=jnp.int32) * block_k
        q_hi = jnp.minimum(q_lo + block_q, q_start + q_count) - 1
        kv_hi = jnp.minimum(kv_lo + block_k, kv_start + kv_count) - 1
        if window is not None:
            # A shard's keys may stick out of the sequence (an edge device's halo): bound the real
            # part of each tile (tiles wholly outside are the caller's to skip).
            kv_lo, kv_hi = jnp.clip(kv_lo, 0, kv_len - 1), jnp.clip(kv_hi, 0, kv_len - 1)
        col = lambda x: x[None, None, :, None]
        row = lambda x: x[None, None, None, :]
        return cls(q_len, kv_len, block_q, block_k, col(q_lo), col(q_hi), row(kv_lo), row(kv_hi),
                   window is not None)

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def shape(self) -> tuple[int, int]:
        """``(nq, nk)``."""
        return self.q_lo.shape[2], self.kv_lo.shape[3]


class Mask:
    """Base class of masks. Subclasses define ``predicate`` and ``bounds``.

    ``predicate(q_len, kv_len, b, h, q_idx, kv_idx)`` takes integer index arrays that broadcast
    against each other (typically ``[B,1,1,1]``, ``[1,H,1,1]``, ``[1,1,T,1]``, ``[1,1,1,S]``;
    a kernel passes its own batch and head as ``[1,1,1,1]``) and returns a boolean array of their
    broadcast shape, or of a shape that broadcasts to it. Per-batch data must be indexed by
    ``b``, never broadcast over all batch elements.

    ``bounds(tiles, batch)`` returns ``(may_any, must_all)``: per tile, whether some entry *may*
    be allowed (an upper bound) and whether every entry is *certainly* allowed (a lower bound),
    each broadcastable to ``[B, H, nq, nk]``. The default evaluates the predicate on every entry
    (exact, ``O(T * S)`` work); masks with a formula override it.
    """

    def predicate(self, q_len: int, kv_len: int, b, h, q_idx, kv_idx) -> Array:
        raise NotImplementedError

    def bounds(self, tiles: Tiles, batch: int) -> tuple[Array, Array]:
        return evaluate_bounds(self, tiles, batch)

    def check(self, batch: int, heads: int, q_len: int, kv_len: int) -> None:
        """Raises ValueError if the mask's arrays do not fit these sizes."""

    def __and__(self, other: "Mask") -> "Mask":
        return And(self, _as_mask(other, "&"))

    def __or__(self, other: "Mask") -> "Mask":
        return Or(self, _as_mask(other, "|"))

    def __invert__(self) -> "Mask":
        return Not(self)

    def materialize(
        self, q_len: int, kv_len: int, *, batch: int = 1, heads: int = 1
    ) -> Bool[Array, "b h T S"]:
        """The dense boolean mask, ``[B or 1, H or 1, T, S]`` (for references and plots)."""
        b, h, q_idx, kv_idx = grid_indices(batch, heads, q_len, kv_len)
        allowed = self.predicate(q_len, kv_len, b, h, q_idx, kv_idx)
        shape = jnp.broadcast_shapes(allowed.shape, (1, 1, q_len, kv_len))
        return jnp.broadcast_to(allowed, shape)

    def block_map(
        self, q_len: int, kv_len: int, block_q: int, block_k: int, *, batch: int = 1, window=None
    ) -> Int8[Array, "b h nq nk"]:
        """Tile classes (``EMPTY``/``PARTIAL``/``FULL``), ``[B or 1, H or 1, nq, nk]``, of the
        whole problem or of ``window = (q_start, q_count, kv_start, kv_count)`` (see :class:`Tiles`)."""
        tiles = Tiles.make(q_len, kv_len, block_q, block_k, window)
        may_any, must_all = self.bounds(tiles, batch)
        classes = jnp.where(may_any, jnp.where(must_all, FULL, PARTIAL), EMPTY).astype(jnp.int8)
        nq, nk = tiles.shape
        return jnp.broadcast_to(classes, jnp.broadcast_shapes(classes.shape, (1, 1, nq, nk)))


def _as_mask(x, op: str) -> Mask:
    if not isinstance(x, Mask):
        raise TypeError(f"masks combine with {op} only with other masks; got {type(x).__name__}")
    return x


def grid_indices(batch: int, heads: int, q_len: int, kv_len: int):
    """Index arrays ``b [B,1,1,1], h [1,H,1,1], q [1,1,T,1], kv [1,1,1,S]``."""
    ar = lambda n: jnp.arange(n, dtype=jnp.int32)
    return (
        ar(batch)[:, None, None, None],
        ar(heads)[None, :, None, None],
        ar(q_len)[None, None, :, None],
        ar(kv_len)[None, None, None, :],
    )


def evaluate_bounds(mask: Mask, tiles: Tiles, batch: int, heads: int = 1):
    """Exact ``(may_any, must_all)`` by evaluating ``mask.predicate`` on every entry, one tile row
    at a time (``O(block_q * S)`` memory). ``heads > 1`` keeps per-head maps, for predicates that
    depend on the head."""
    (nq, nk), bq, bk = tiles.shape, tiles.block_q, tiles.block_k
    b, h, _, _ = grid_indices(batch, heads, 1, 1)
    kv_idx = (tiles.kv_lo[0, 0, 0][:, None] + jnp.arange(bk, dtype=jnp.int32)).reshape(1, 1, 1, nk * bk)
    kv_valid = kv_idx <= jnp.repeat(tiles.kv_hi[0, 0, 0], bk)

    def row(i):
        q_idx = (tiles.q_lo[0, 0, i, 0] + jnp.arange(bq, dtype=jnp.int32))[None, None, :, None]
        valid = (q_idx <= tiles.q_hi[0, 0, i, 0]) & kv_valid
        allowed = mask.predicate(tiles.q_len, tiles.kv_len, b, h, q_idx, kv_idx)
        allowed, valid = jnp.broadcast_arrays(allowed, valid)
        split = lambda x: x.reshape(*x.shape[:-1], nk, bk)
        allowed, valid = split(allowed), split(valid)
        return (allowed & valid).any((-3, -1)), (allowed | ~valid).all((-3, -1))

    may_any, must_all = jax.lax.map(row, jnp.arange(nq))  # [nq, B?, H?, nk]
    move = lambda x: jnp.moveaxis(x, 0, -2)
    return move(may_any), move(must_all)


# --------------------------------------------------------------------------------------------
# Algebra, and masks from any function


@pytree_dataclass(data=("a", "b"))
class And(Mask):
    a: Mask
    b: Mask

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        args = (q_len, kv_len, b, h, q_idx, kv_idx)
        return self.a.predicate(*args) & self.b.predicate(*args)

    def bounds(self, tiles, batch):
        (a_any, a_all), (b_any, b_all) = self.a.bounds(tiles, batch), self.b.bounds(tiles, batch)
        return a_any & b_any, a_all & b_all

    def check(self, *sizes):
        self.a.check(*sizes)
        self.b.check(*sizes)


@pytree_dataclass(data=("a", "b"))
class Or(Mask):
    a: Mask
    b: Mask

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        args = (q_len, kv_len, b, h, q_idx, kv_idx)
        return self.a.predicate(*args) | self.b.predicate(*args)

    def bounds(self, tiles, batch):
        (a_any, a_all), (b_any, b_all) = self.a.bounds(tiles, batch), self.b.bounds(tiles, batch)
        return a_any | b_any, a_all | b_all

    def check(self, *sizes):
        self.a.check(*sizes)
        self.b.check(*sizes)


@pytree_dataclass(data=("a",))
class Not(Mask):
    a: Mask

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        return ~self.a.predicate(q_len, kv_len, b, h, q_idx, kv_idx)

    def bounds(self, tiles, batch):
        a_any, a_all = self.a.bounds(tiles, batch)
        # Not certainly all-true means some entry may be false; certainly none true means all false.
        return ~a_all, ~a_any

    def check(self, *sizes):
        self.a.check(*sizes)


@pytree_dataclass(meta=("fn", "heads"))
class FromFn(Mask):
    fn: Callable
    heads: int = 1  # > 1 if fn depends on the head: block maps are then kept per head

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        return jnp.asarray(self.fn(b, h, q_idx, kv_idx), dtype=bool)

    def bounds(self, tiles, batch):
        # No formula to reason with: evaluate it (per head only if declared head-dependent).
        return evaluate_bounds(self, tiles, batch, self.heads)

    def check(self, batch, heads, q_len, kv_len):
        if self.heads not in (1, heads):
            raise ValueError(f"from_fn mask was declared with heads={self.heads}; the op has {heads} heads")


def from_fn(fn: Callable, *, heads: int = 1) -> Mask:
    """A mask from any function ``fn(b, h, q_idx, kv_idx) -> bool`` of broadcasting index arrays.

    Indices are raw (not aligned): ``q_idx`` in ``[0, T)``, ``kv_idx`` in ``[0, S)``. The block
    map is computed by evaluating ``fn`` one tile row at a time; pass ``heads=H`` if ``fn``
    depends on the head, so block maps are kept per head.
    """
    if not callable(fn):
        raise TypeError(f"from_fn needs a callable (b, h, q_idx, kv_idx) -> bool; got {fn!r}")
    return FromFn(fn, _checks.positive_int("from_fn heads", heads))


