"""The dense reference of :func:`attnjax.ops.gathered_attention`: ``ops.attention`` under the
``[B, H, T, S]`` mask that the block lists imply (and the extra mask), with the per-key bias as a
dense bias. ``O(T S)`` memory by design."""

from __future__ import annotations

import jax.numpy as jnp

from attnjax import masks
from attnjax.ops.attention.api import attention


def block_mask(indices, T, S, block_q, block_k, H):
    """``allowed [B, H, T, S]`` of the listed blocks (a set; padding slots ignored)."""
    nk = -(-S // block_k)
    slot_ok = (indices >= 0) & (indices < nk)
    hot = (jnp.where(slot_ok, indices, nk)[..., None] == jnp.arange(nk)).any(-2)  # [B, Hs, nq, nk]
    hot = jnp.repeat(hot, H // hot.shape[1], axis=1)
    return hot[:, :, jnp.arange(T) // block_q][:, :, :, jnp.arange(S) // block_k]


def gathered(q, k, v, indices, block_q, block_k, extra_mask, key_bias, scale):
    T, H, S = q.shape[1], q.shape[2], k.shape[1]
    mask = masks.dense(block_mask(indices, T, S, block_q, block_k, H))
    if extra_mask is not None:
        mask = mask & extra_mask
    bias = None
    if key_bias is not None:
        bias = jnp.repeat(key_bias.astype(jnp.float32), H // key_bias.shape[1], axis=1)[:, :, None, :]
    return attention(q, k, v, bias=bias, mask=mask, scale=scale, return_lse=True, implementation="reference")
