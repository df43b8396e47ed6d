"""Top-k key masks: query ``i`` keeps the keys whose score reaches its threshold.

``TopKeys(score [B, H, S], threshold [B, H, T])`` allows ``(i, j)`` iff
``score[b, h, j] >= threshold[b, h, i]``; its block map compares per-tile extremes (a tile may
hold an allowed entry iff its largest key score reaches its smallest threshold; it is full iff
its smallest key score reaches its largest threshold), so it costs ``O((T + S) + nq nk)``.
:func:`prefix_thresholds` gives the running top-``w`` thresholds of Dynamic Mask Attention.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attnjax.core.pytree import pytree_dataclass
from attnjax.core.tiling import take
from attnjax.masks.base import Mask, evaluate_bounds


@pytree_dataclass(data=("score", "threshold"))
class TopKeys(Mask):
    score: Array  # [B, H, S] float32
    threshold: Array  # [B, H, T] float32

    INDEXED: ClassVar = {"score": ("batch", "heads", "kv"), "threshold": ("batch", "heads", "q")}

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        s = take(self.score, b, h, jnp.clip(kv_idx, 0, kv_len - 1))
        t = take(self.threshold, b, h, jnp.clip(q_idx, 0, q_len - 1))
        return s >= t

    def bounds(self, tiles, batch):
        if tiles.window:
            return evaluate_bounds(self, tiles, batch, self.score.shape[1])
        (nq, nk), bq, bk = tiles.shape, tiles.block_q, tiles.block_k
        T, S = self.threshold.shape[-1], self.score.shape[-1]

        def per_tile(x, n, block, fill, reduce):
            x = jnp.pad(x, ((0, 0), (0, 0), (0, n * block - x.shape[-1])), constant_values=fill)
            return reduce(x.reshape(*x.shape[:2], n, block), axis=-1)

        s_max = per_tile(self.score, nk, bk, -jnp.inf, jnp.max)[:, :, None, :]
        s_min = per_tile(self.score, nk, bk, jnp.inf, jnp.min)[:, :, None, :]
        t_min = per_tile(self.threshold, nq, bq, jnp.inf, jnp.min)[:, :, :, None]
        t_max = per_tile(self.threshold, nq, bq, -jnp.inf, jnp.max)[:, :, :, None]
        del T, S
        return s_max >= t_min, s_min >= t_max

    def check(self, batch, heads, q_len, kv_len):
        if self.score.shape != (batch, heads, kv_len) or self.threshold.shape != (batch, heads, q_len):
            raise ValueError(
                f"topk_keys has score {self.score.shape} and threshold {self.threshold.shape}; expected "
                f"[batch={batch}, heads={heads}, kv_len={kv_len}] and [batch, heads, q_len={q_len}]"
            )


def topk_keys(score: Float[Array, "B H S"], threshold: Float[Array, "B H T"]) -> Mask:
    """The mask ``score[b, h, j] >= threshold[b, h, i]`` (see :class:`TopKeys`)."""
    return TopKeys(jnp.asarray(score, jnp.float32), jnp.asarray(threshold, jnp.float32))


def prefix_thresholds(score: Float[Array, "B H S"], w: int, block: int = 64) -> Float[Array, "B H S"]:
    """``t[b, h, p]`` = the ``w``-th largest of ``score[b, h, :p + 1]`` (``-inf`` while ``p < w - 1``):
    a running top-``w`` over key blocks, ``O(S (w + block))`` memory, never ``[S, S]``."""
    B, H, S = score.shape
    c = min(block, S)
    n = -(-S // c)
    x = jnp.pad(score.astype(jnp.float32), ((0, 0), (0, 0), (0, n * c - S)), constant_values=-jnp.inf)
    x = x.reshape(B, H, n, c).transpose(2, 0, 1, 3)  # [n, B, H, c]
    upto = jnp.arange(c)[None, :] <= jnp.arange(c)[:, None]  # [c (position), c (key)]

    def step(buf, blk):  # buf [B, H, w]: the top-w so far
        cand = jnp.concatenate(
            [
                jnp.broadcast_to(buf[:, :, None, :], (B, H, c, w)),
                jnp.where(upto, blk[:, :, None, :], -jnp.inf),
            ],
            -1,
        )  # [B, H, c, w + c]
        t = lax.top_k(cand, w)[0][..., -1]
        return lax.top_k(jnp.concatenate([buf, blk], -1), w)[0], t

    _, t = lax.scan(step, jnp.full((B, H, w), -jnp.inf), x)
    return t.transpose(1, 2, 0, 3).reshape(B, H, n * c)[:, :, :S]
