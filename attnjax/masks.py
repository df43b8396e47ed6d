"""Attention masks: analytic predicates, their algebra, and block maps.

A mask answers one question: may query position ``q_idx`` attend to key position ``kv_idx``
(in batch element ``b``, query head ``h``)? Masks combine with ``&``, ``|`` and ``~``.

**Alignment.** With ``T`` queries and ``S`` keys, positional masks (``causal``,
``sliding_window``, ``chunked``, ``prefix_lm``) align queries with the *end* of the key
sequence ("bottom-right", as in decoding with a cache): query ``i`` sits at absolute position
``i + S - T``. With ``T == S`` this is the usual alignment; with ``T < S`` the queries are the
last ``T`` tokens; with ``T > S`` the first ``T - S`` queries see no key under ``causal`` and
give zeros.

**Block maps.** For tile sizes ``(block_q, block_k)`` a mask classifies every tile of the
``[T, S]`` score matrix as ``EMPTY`` (nothing allowed: skipped), ``FULL`` (everything allowed:
no mask evaluation) or ``PARTIAL``. The classification comes from the mask's formula applied
to each tile's index bounds (interval arithmetic), never from a materialized ``[T, S]`` array,
so it is cheap at a million tokens and works under ``jit`` with traced segment ids. It is
conservative: a tile may be called ``PARTIAL`` when it is in fact empty or full (only costing
speed), but never ``EMPTY`` or ``FULL`` wrongly.

Example:

>>> import jax.numpy as jnp
>>> from attnjax import masks
>>> m = masks.causal() & masks.sliding_window(2)
>>> m.materialize(4, 4)[0, 0].astype(int)
Array([[1, 0, 0, 0],
       [1, 1, 0, 0],
       [1, 1, 1, 0],
       [0, 1, 1, 1]], dtype=int32)
>>> m.block_map(8, 8, block_q=2, block_k=2)[0, 0]
Array([[1, 0, 0, 0],
       [1, 1, 0, 0],
       [0, 1, 1, 0],
       [0, 0, 1, 1]], dtype=int8)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, Int8

from attnjax import _checks

EMPTY, PARTIAL, FULL = 0, 1, 2
"""Tile classes in a block map."""


def _pytree(data: tuple[str, ...] = (), meta: tuple[str, ...] = ()):
    """Registers a frozen dataclass as a pytree: ``data`` fields are leaves, ``meta`` static."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))

    return wrap


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
# Algebra


@_pytree(data=("a", "b"))
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


@_pytree(data=("a", "b"))
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


@_pytree(data=("a",))
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


# --------------------------------------------------------------------------------------------
# Positional masks


@_pytree()
class Causal(Mask):
    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + (kv_len - q_len)

    def bounds(self, tiles, batch):
        off = tiles.offset
        return tiles.kv_lo <= tiles.q_hi + off, tiles.kv_hi <= tiles.q_lo + off


@_pytree(meta=("left", "right"))
class SlidingWindow(Mask):
    left: int
    right: int

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        pos = q_idx + (kv_len - q_len)
        return (kv_idx >= pos - self.left) & (kv_idx <= pos + self.right)

    def bounds(self, tiles, batch):
        off = tiles.offset
        may_any = (tiles.kv_hi >= tiles.q_lo + off - self.left) & (
            tiles.kv_lo <= tiles.q_hi + off + self.right
        )
        must_all = (tiles.kv_lo >= tiles.q_hi + off - self.left) & (
            tiles.kv_hi <= tiles.q_lo + off + self.right
        )
        return may_any, must_all


@_pytree(meta=("size",))
class Chunked(Mask):
    size: int

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        return (q_idx + (kv_len - q_len)) // self.size == kv_idx // self.size

    def bounds(self, tiles, batch):
        off, n = tiles.offset, self.size
        q_lo, q_hi = (tiles.q_lo + off) // n, (tiles.q_hi + off) // n
        kv_lo, kv_hi = tiles.kv_lo // n, tiles.kv_hi // n
        may_any = (q_lo <= kv_hi) & (kv_lo <= q_hi)
        must_all = (q_lo == q_hi) & (kv_lo == kv_hi) & (q_lo == kv_lo)
        return may_any, must_all


@_pytree(data=("length",))
class KeyPrefix(Mask):
    """Keys before ``length`` (a scalar or one length per batch element) are visible."""

    length: Array

    def _at(self, b):
        return self.length if jnp.ndim(self.length) == 0 else self.length[b]

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        return kv_idx < self._at(b)

    def bounds(self, tiles, batch):
        n = self._at(jnp.arange(batch)[:, None, None, None])
        return tiles.kv_lo < n, tiles.kv_hi < n

    def check(self, batch, heads, q_len, kv_len):
        shape = jnp.shape(self.length)
        if shape not in ((), (batch,)):
            raise ValueError(f"prefix_len must be a scalar or have shape [batch={batch}]; got shape {shape}")


# --------------------------------------------------------------------------------------------
# Content masks


@_pytree(data=("q_segment_ids", "kv_segment_ids"))
class Document(Mask):
    q_segment_ids: Array  # [B, T]
    kv_segment_ids: Array  # [B, S]

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        # Indices past the end (tile padding) are clipped; the caller masks them separately.
        q_seg = self.q_segment_ids[b, jnp.clip(q_idx, 0, q_len - 1)]
        kv_seg = self.kv_segment_ids[b, jnp.clip(kv_idx, 0, kv_len - 1)]
        return q_seg == kv_seg

    def bounds(self, tiles, batch):
        def tile_range(seg, lo, hi, block):
            # Positions of each tile, the clipped tail repeating the last real one, so the per-tile
            # min/max are those of real positions.
            pos = jnp.minimum(lo.reshape(-1, 1) + jnp.arange(block, dtype=jnp.int32), hi.reshape(-1, 1))
            ids = seg[:, pos]  # [B, n, block]
            return ids.min(-1), ids.max(-1)  # [B, n]

        q_min, q_max = tile_range(self.q_segment_ids, tiles.q_lo, tiles.q_hi, tiles.block_q)
        kv_min, kv_max = tile_range(self.kv_segment_ids, tiles.kv_lo, tiles.kv_hi, tiles.block_k)
        col = lambda x: x[:, None, :, None]
        row = lambda x: x[:, None, None, :]
        q_min, q_max, kv_min, kv_max = col(q_min), col(q_max), row(kv_min), row(kv_max)
        may_any = (q_min <= kv_max) & (kv_min <= q_max)
        must_all = (q_min == q_max) & (kv_min == kv_max) & (q_min == kv_min)
        return may_any, must_all

    def check(self, batch, heads, q_len, kv_len):
        for name, ids, length, what in (
            ("q_segment_ids", self.q_segment_ids, q_len, "q_len"),
            ("kv_segment_ids", self.kv_segment_ids, kv_len, "kv_len"),
        ):
            shape = jnp.shape(ids)
            if shape != (batch, length):
                raise ValueError(
                    f"document mask {name} has shape {shape}; expected [batch={batch}, {what}={length}]"
                )


@_pytree(meta=("fn", "heads"))
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


# --------------------------------------------------------------------------------------------
# Constructors


def causal() -> Mask:
    """Causal mask, bottom-right aligned: query ``i`` sees keys ``kv <= i + S - T``."""
    return Causal()


def sliding_window(left: int, right: int = 0) -> Mask:
    """Band mask: query ``i`` (at position ``p = i + S - T``) sees keys ``p - left .. p + right``.

    ``sliding_window(w)`` is causal local attention over the ``w`` previous tokens and itself.
    """
    left = _checks.positive_int("sliding_window left", left, allow_zero=True)
    right = _checks.positive_int("sliding_window right", right, allow_zero=True)
    return SlidingWindow(left, right)


def chunked(size: int) -> Mask:
    """Block-diagonal mask: positions attend within chunks of ``size`` (combine with ``causal``)."""
    return Chunked(_checks.positive_int("chunked size", size))


def document(
    q_segment_ids: Int[Array, "B T"], kv_segment_ids: Int[Array, "B S"] | None = None
) -> Mask:
    """Packed documents: a query sees a key only if their segment ids are equal.

    ``q_segment_ids`` is ``[B, T]``, ``kv_segment_ids`` is ``[B, S]`` (defaults to the same as
    ``q_segment_ids`` for self attention). Ids need not be sorted; block skipping is best when
    documents are contiguous. Works under ``jit`` with traced ids.
    """
    q_segment_ids = jnp.asarray(q_segment_ids)
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else jnp.asarray(kv_segment_ids)
    for name, ids in (("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids)):
        _checks.check_rank(name, ids, ("batch", "length"))
        _checks.check_int_array(name, ids)
    return Document(q_segment_ids, kv_segment_ids)


def prefix_lm(prefix_len: int | Int[Array, "B"]) -> Mask:
    """Prefix-LM: bidirectional over the first ``prefix_len`` keys, causal after them.

    ``prefix_len`` is an int or one length per batch element (``[B]``).
    """
    if isinstance(prefix_len, int):
        _checks.positive_int("prefix_len", prefix_len, allow_zero=True)
    length = jnp.asarray(prefix_len)
    _checks.check_int_array("prefix_len", length)
    return Causal() | KeyPrefix(length)


def from_fn(fn: Callable, *, heads: int = 1) -> Mask:
    """A mask from any function ``fn(b, h, q_idx, kv_idx) -> bool`` of broadcasting index arrays.

    Indices are raw (not aligned): ``q_idx`` in ``[0, T)``, ``kv_idx`` in ``[0, S)``. The block
    map is computed by evaluating ``fn`` one tile row at a time; pass ``heads=H`` if ``fn``
    depends on the head, so block maps are kept per head.
    """
    if not callable(fn):
        raise TypeError(f"from_fn needs a callable (b, h, q_idx, kv_idx) -> bool; got {fn!r}")
    return FromFn(fn, _checks.positive_int("from_fn heads", heads))


def collapse(block_map: Int8[Array, "b h nq nk"], pad_kv: bool = False) -> Int8[Array, "nq nk"]:
    """Reduces a block map over batch and heads: a tile is EMPTY/FULL only if it is for all.

    ``pad_kv`` marks the last key tile PARTIAL where FULL: a padded tile must be masked.
    """
    all_empty = (block_map == EMPTY).all((0, 1))
    all_full = (block_map == FULL).all((0, 1))
    classes = jnp.where(all_empty, EMPTY, jnp.where(all_full, FULL, PARTIAL)).astype(jnp.int8)
    if pad_kv:
        last = classes[:, -1]
        classes = classes.at[:, -1].set(jnp.where(last == FULL, PARTIAL, last).astype(jnp.int8))
    return classes


from attnjax.neighborhood import Neighborhood, neighborhood  # noqa: E402,F401  (imports Mask from here)
