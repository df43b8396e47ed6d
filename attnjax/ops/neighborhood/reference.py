"""Dense reference of :func:`attnjax.ops.neighborhood_attention`: the generic op's reference on
the flattened grid, under the neighborhood mask (``O(N^2)``, obviously correct)."""

from __future__ import annotations

from attnjax.masks.neighborhood import Neighborhood
from attnjax.ops.attention.api import attention


def flat(x):
    """``[B, *spatial, H, D] -> [B, prod(spatial), H, D]`` (row-major)."""
    return x.reshape(x.shape[0], -1, *x.shape[-2:])


def neighborhood_attention(q, k, v, mask: Neighborhood, scale: float):
    out = attention(flat(q), flat(k), flat(v), mask=mask, scale=scale, implementation="reference")
    return out.reshape(*q.shape[:-1], v.shape[-1])
