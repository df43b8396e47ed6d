r"""Halo exchange: neighborhood attention with the first spatial axis sharded over devices.

A query's neighborhood reaches at most ``r_left`` rows before it and ``r_right`` rows after it
along the sharded axis (about ``(kernel_size - 1) * dilation``; zero after it on a causal axis).
Each device receives those rows of K/V from its two neighbours (``ppermute``), and attends its
own queries to ``[halo | own rows | halo]`` with the *global* neighborhood mask (through
:class:`attnjax.ops.Shard` offsets, so border clamping is that of the whole grid). Devices at
the edges get zero-filled halos, which lie outside the global grid and are never attended.

**Cost** per device: two transfers of ``r * (other spatial extents) * K * (D + E)`` elements,
independent of the number of devices; compute is that of the local rows plus halos.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax.masks.neighborhood import Neighborhood, axis_windows
from attnjax.ops import attention
from attnjax.core import Shard
from attnjax.ops.neighborhood.api import validate


def reach(window) -> tuple[int, int]:
    """``(before, after)``: how far, along one axis, a query's neighborhood extends (exact)."""
    i = np.arange(window.extent)[:, None]
    j = np.arange(window.extent)[None, :]
    ok = np.asarray(window.allowed(i, j, np))
    dist = np.broadcast_to(i - j, ok.shape)[ok]
    return max(int(dist.max()), 0), max(int(-dist.min()), 0)


def halo_neighborhood_attention(q, k, v, *, axis_name: str, kernel_size, dilation=1, stride=1,
                                is_causal=False, scale: float | None = None, implementation=None,
                                batch_shard: tuple | None = None, head_shard: tuple | None = None):
    """:func:`attnjax.ops.neighborhood_attention` with the first spatial axis sharded contiguously
    along ``axis_name`` (call inside ``shard_map``).

    Args:
      q, k, v: this device's rows ``[B, n, *rest, H, D]`` (``[B, n, *rest, K, D|E]``) of a grid
        whose first axis has extent ``n * P``.
      axis_name: the mesh axis of the first spatial axis.
      kernel_size, dilation, stride, is_causal, scale: as in
        :func:`attnjax.ops.neighborhood_attention`, for the global grid.
      batch_shard, head_shard: ``(global size, offset)`` when batch or heads are also sharded.

    Returns:
      ``[B, n, *rest, H, E]``, this device's rows.
    """
    local, scale = validate(q, k, v, scale)
    P = lax.axis_size(axis_name)
    n, rest = local[0], local[1:]
    axes = axis_windows((n * P, *rest), kernel_size, dilation, stride, is_causal)
    before, after = reach(axes[0])
    if max(before, after) > n:
        raise ValueError(
            f"the neighborhood reaches {max(before, after)} rows along the sharded axis, more than the {n} "
            f"rows each of the {P} devices on {axis_name!r} holds; use fewer devices or a smaller window"
        )
    me = lax.axis_index(axis_name)

    def halo(x):
        parts = []
        if before:  # my last rows go to the next device; device 0 receives zeros
            parts.append(lax.ppermute(x[:, n - before:], axis_name, [(i, i + 1) for i in range(P - 1)]))
        parts.append(x)
        if after:  # my first rows go to the previous device
            parts.append(lax.ppermute(x[:, :after], axis_name, [(i, i - 1) for i in range(1, P)]))
        return jnp.concatenate(parts, axis=1)

    B, H = q.shape[0], q.shape[-2]
    row = math.prod(rest)
    flat = lambda x: x.reshape(B, -1, *x.shape[-2:])
    (gb, b0), (gh, h0) = batch_shard or (B, 0), head_shard or (H, 0)
    shard = Shard.make(batch=gb, heads=gh, q_len=n * P * row, kv_len=n * P * row, batch_offset=b0,
                       head_offset=h0, q_offset=me * n * row, kv_offset=(me * n - before) * row)
    out = attention(flat(q), flat(halo(k)), flat(halo(v)), mask=Neighborhood(axes), scale=scale,
                    shard=shard, implementation=implementation)
    return out.reshape(*q.shape[:-1], v.shape[-1])
