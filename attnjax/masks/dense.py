"""Dense masks: a boolean array as a mask, for references and masks from other libraries."""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Bool

from attnjax.core.pytree import pytree_dataclass
from attnjax.core.tiling import take
from attnjax.masks.base import Mask, evaluate_bounds


@pytree_dataclass(data=("allowed",))
class Dense(Mask):
    """A mask given as a boolean array broadcastable to ``[B, H, T, S]`` (rank 4).

    For adapting dense masks from other libraries: it costs ``O(T * S)`` memory by nature.
    Its block map is computed exactly from the array (per tile ``any``/``all``).
    """

    allowed: Array

    INDEXED: ClassVar = {"allowed": ("batch", "heads", "q", "kv")}

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        a = self.allowed
        # Indices past the end (tile padding) are clipped; the caller masks them separately.
        pick = lambda idx, axis, n: 0 if a.shape[axis] == 1 else jnp.clip(idx, 0, n - 1)
        return take(a, pick(b, 0, a.shape[0]), pick(h, 1, a.shape[1]),
                    jnp.clip(q_idx, 0, q_len - 1), jnp.clip(kv_idx, 0, kv_len - 1))

    def bounds(self, tiles, batch):
        a = self.allowed
        if tiles.window:
            return evaluate_bounds(self, tiles, batch, a.shape[1])
        nq, nk = tiles.q_lo.shape[2], tiles.kv_lo.shape[3]
        bq, bk = tiles.block_q, tiles.block_k
        T, S = a.shape[2], a.shape[3]

        def tile_reduce(fill, reduce):
            x = jnp.pad(a, ((0, 0), (0, 0), (0, nq * bq - T), (0, nk * bk - S)), constant_values=fill)
            return reduce(x.reshape(*a.shape[:2], nq, bq, nk, bk), axis=(3, 5))

        # Padding never makes a tile non-empty nor non-full.
        return tile_reduce(False, jnp.any), tile_reduce(True, jnp.all)

    def check(self, batch, heads, q_len, kv_len):
        shape = jnp.shape(self.allowed)
        if len(shape) != 4 or shape[2:] != (q_len, kv_len) or shape[0] not in (1, batch) or shape[1] not in (1, heads):
            raise ValueError(
                f"dense mask has shape {shape}; expected [batch={batch} or 1, heads={heads} or 1, "
                f"q_len={q_len}, kv_len={kv_len}]"
            )


def dense(allowed: Bool[Array, "#B #H T S"]) -> Mask:
    """A boolean array (``True`` = attend), ``[T, S]`` up to ``[B|1, H|1, T, S]``, as a mask
    (see :class:`Dense`): ``O(T * S)`` memory, for references and masks from other libraries."""
    allowed = jnp.asarray(allowed)
    if allowed.ndim < 2:
        raise ValueError(f"a dense mask needs at least [q_len, kv_len] axes; got shape {allowed.shape}")
    allowed = allowed.reshape((1,) * (4 - allowed.ndim) + allowed.shape) if allowed.ndim < 4 else allowed
    return Dense(allowed.astype(bool))
