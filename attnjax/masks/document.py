"""Document (segment-id) masks for packed sequences: a query sees keys of its own document."""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Int

from attnjax import _checks
from attnjax.core.pytree import pytree_dataclass
from attnjax.core.tiling import take
from attnjax.masks.base import Mask


@pytree_dataclass(data=("q_segment_ids", "kv_segment_ids"))
class Document(Mask):
    q_segment_ids: Array  # [B, T]
    kv_segment_ids: Array  # [B, S]

    INDEXED: ClassVar = {"q_segment_ids": ("batch", "q"), "kv_segment_ids": ("batch", "kv")}

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        # Indices past the end (tile padding) are clipped; the caller masks them separately.
        # (Kernels pad these arrays with their last id instead, which reads the same.)
        q_seg = take(self.q_segment_ids, b, jnp.clip(q_idx, 0, q_len - 1))
        kv_seg = take(self.kv_segment_ids, b, jnp.clip(kv_idx, 0, kv_len - 1))
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
