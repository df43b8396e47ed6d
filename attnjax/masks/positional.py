"""Positional masks: causal, sliding window, chunked and prefix-LM, aligned bottom-right
(query ``i`` of ``T`` sits at position ``i + S - T`` among ``S`` keys, as when decoding with a
cache; causal and sliding windows also top-left, position ``i``, as jax.nn and Flax align
them); padding (sequence lengths), on raw positions."""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from attnjax import _checks
from attnjax.core.pytree import pytree_dataclass
from attnjax.core.tiling import take
from attnjax.masks.base import Mask


ALIGNMENTS = ("bottom_right", "top_left")


def _alignment(align: str) -> bool:
    """``top_left`` as a bool (the masks' static field), after checking ``align``."""
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}; got {align!r}")
    return align == "top_left"


@pytree_dataclass(meta=("top_left",))
class Causal(Mask):
    top_left: bool = False

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + (0 if self.top_left else kv_len - q_len)

    def bounds(self, tiles, batch):
        off = 0 if self.top_left else tiles.offset
        return tiles.kv_lo <= tiles.q_hi + off, tiles.kv_hi <= tiles.q_lo + off


@pytree_dataclass(meta=("left", "right", "top_left"))
class SlidingWindow(Mask):
    left: int
    right: int
    top_left: bool = False

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        pos = q_idx + (0 if self.top_left else kv_len - q_len)
        return (kv_idx >= pos - self.left) & (kv_idx <= pos + self.right)

    def bounds(self, tiles, batch):
        off = 0 if self.top_left else tiles.offset
        may_any = (tiles.kv_hi >= tiles.q_lo + off - self.left) & (
            tiles.kv_lo <= tiles.q_hi + off + self.right
        )
        must_all = (tiles.kv_lo >= tiles.q_hi + off - self.left) & (
            tiles.kv_hi <= tiles.q_lo + off + self.right
        )
        return may_any, must_all


@pytree_dataclass(meta=("size",))
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


@pytree_dataclass(data=("length",))
class KeyPrefix(Mask):
    """Keys before ``length`` (a scalar or one length per batch element) are visible."""

    length: Array

    INDEXED: ClassVar = {"length": ("batch",)}

    def _at(self, b):
        return self.length if np.ndim(self.length) == 0 else take(self.length, b)

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        return kv_idx < self._at(b)

    def bounds(self, tiles, batch):
        n = self._at(jnp.arange(batch)[:, None, None, None])
        return tiles.kv_lo < n, tiles.kv_hi < n

    def check(self, batch, heads, q_len, kv_len):
        shape = jnp.shape(self.length)
        if shape not in ((), (batch,)):
            raise ValueError(
                "key prefix lengths (prefix_lm's prefix_len, padding's lengths) must be a scalar or have shape "
                f"[batch={batch}]; got shape {shape}"
            )


@pytree_dataclass(data=("length",))
class QueryPrefix(Mask):
    """Queries before ``length`` (a scalar or one length per batch element) see keys; the rest
    (padding) see none, so their outputs are zeros."""

    length: Array

    INDEXED: ClassVar = {"length": ("batch",)}

    def _at(self, b):
        return self.length if np.ndim(self.length) == 0 else take(self.length, b)

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        return q_idx < self._at(b)

    def bounds(self, tiles, batch):
        n = self._at(jnp.arange(batch)[:, None, None, None])
        return tiles.q_lo < n, tiles.q_hi < n

    def check(self, batch, heads, q_len, kv_len):
        shape = jnp.shape(self.length)
        if shape not in ((), (batch,)):
            raise ValueError(
                f"query prefix lengths (padding's q_lengths) must be a scalar or have shape [batch={batch}]; "
                f"got shape {shape}"
            )


def causal(align: str = "bottom_right") -> Mask:
    """Causal mask: query ``i`` sees keys ``kv <= i + S - T`` (``align="bottom_right"``, the
    library's convention, right for decoding with a cache) or ``kv <= i`` (``"top_left"``, what
    ``jax.nn.dot_product_attention(is_causal=True)`` and Flax mean). Both agree when ``T == S``."""
    return Causal(_alignment(align))


def sliding_window(left: int, right: int = 0, align: str = "bottom_right") -> Mask:
    """Band mask: query ``i`` (at position ``p = i + S - T``, or ``p = i`` with
    ``align="top_left"`` as jax.nn's ``local_window_size``) sees keys ``p - left .. p + right``.

    ``sliding_window(w)`` is causal local attention over the ``w`` previous tokens and itself.
    """
    left = _checks.positive_int("sliding_window left", left, allow_zero=True)
    right = _checks.positive_int("sliding_window right", right, allow_zero=True)
    return SlidingWindow(left, right, _alignment(align))


def chunked(size: int) -> Mask:
    """Block-diagonal mask: positions attend within chunks of ``size`` (combine with ``causal``)."""
    return Chunked(_checks.positive_int("chunked size", size))


def prefix_lm(prefix_len: int | Int[Array, " B"]) -> Mask:
    """Prefix-LM: bidirectional over the first ``prefix_len`` keys, causal after them.

    ``prefix_len`` is an int or one length per batch element (``[B]``).
    """
    if isinstance(prefix_len, int):
        _checks.positive_int("prefix_len", prefix_len, allow_zero=True)
    length = jnp.asarray(prefix_len)
    _checks.check_int_array("prefix_len", length)
    return Causal() | KeyPrefix(length)


def padding(lengths: int | Int[Array, " B"], q_lengths: int | Int[Array, " B"] | None = None) -> Mask:
    """Padded batches: keys at positions ``>= lengths[b]`` are padding and never attended to.

    ``lengths`` is an int or one length per batch element (``[B]``, may be traced). With
    ``q_lengths``, queries at positions ``>= q_lengths[b]`` are padding too: they see no key
    and their outputs are zeros (as ``jax.nn.dot_product_attention``'s ``query_seq_lengths``).
    Positions are raw indices (padding at the end of each sequence), not aligned. Block maps
    skip the padded tiles. This is what ``ops.attention(key_value_seq_lengths=...,
    query_seq_lengths=...)`` builds.

    >>> import jax.numpy as jnp
    >>> from attnjax import masks
    >>> masks.padding(jnp.array([2, 3])).materialize(2, 4, batch=2)[:, 0].astype(int)
    Array([[[1, 1, 0, 0],
            [1, 1, 0, 0]],
    <BLANKLINE>
           [[1, 1, 1, 0],
            [1, 1, 1, 0]]], dtype=int32)
    """
    out = KeyPrefix(_lengths("lengths", lengths))
    return out if q_lengths is None else out & QueryPrefix(_lengths("q_lengths", q_lengths))


def _lengths(name: str, x) -> Array:
    if isinstance(x, int):
        _checks.positive_int(name, x, allow_zero=True)
    x = jnp.asarray(x)
    _checks.check_int_array(name, x)
    if x.ndim > 1:
        raise ValueError(f"{name} must be a scalar or have shape [batch]; got shape {x.shape}")
    return x
