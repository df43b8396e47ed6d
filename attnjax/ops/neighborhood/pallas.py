"""The ``pallas`` implementation of :func:`attnjax.ops.neighborhood_attention`: the flash
template of :mod:`kernels_pallas.flash` (the one block-sparse kernel), driven by the
neighborhood mask's tile order.

Tokens are permuted tile by tile, so that each kernel tile of ``prod(tile)`` consecutive
positions is one multi-dimensional tile of the grid; the block map of the permuted mask
(:class:`attnjax.masks.TiledNeighborhood`) is then exact and mostly EMPTY or FULL, and the kernel
visits only the tiles a window touches (work proportional to the window, as NATTEN's kernels).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from attnjax.core.blocks import BlockSizes
from attnjax.core.tiling import Dims, Problem
from attnjax.masks.neighborhood import Neighborhood, TiledNeighborhood
from attnjax.normalizers import softmax


def neighborhood_attention(q, k, v, mask: Neighborhood, scale: float, tile: tuple[int, ...]):
    """``q [B, *spatial, H, D]``, ``k/v [B, *spatial, K, D/E]`` -> ``[B, *spatial, H, E]``."""
    from kernels_pallas.flash import flash_attention  # imported lazily: Pallas is heavy to import

    tiled = TiledNeighborhood(mask.axes, tile)
    spatial, grid = mask.spatial_shape, tiled.grid
    r = len(spatial)

    def to_tiles(x):
        pad = [(0, 0)] + [(0, g * t - n) for g, t, n in zip(grid, tile, spatial)] + [(0, 0)] * 2
        x = jnp.pad(x, pad)
        x = x.reshape(x.shape[0], *[d for g, t in zip(grid, tile) for d in (g, t)], *x.shape[-2:])
        x = x.transpose(0, *range(1, 2 * r, 2), *range(2, 2 * r + 1, 2), 2 * r + 1, 2 * r + 2)
        return x.reshape(x.shape[0], -1, *x.shape[-2:])

    qt, kt, vt = to_tiles(q), to_tiles(k), to_tiles(v)
    B, N, H, D = qt.shape
    problem = Problem(Dims(B, N, N, H, kt.shape[2], D, vt.shape[-1]), scale, tiled, None, softmax())
    block = math.prod(tile)
    out, _ = flash_attention(problem, qt, kt, vt, None, BlockSizes(block, block))
    out = out.reshape(out.shape[0], *grid, *tile, *out.shape[-2:])
    out = out.transpose(0, *[x for a in range(r) for x in (1 + a, 1 + r + a)], 2 * r + 1, 2 * r + 2)
    out = out.reshape(out.shape[0], *[g * t for g, t in zip(grid, tile)], *out.shape[-2:])
    return out[(slice(None), *[slice(0, n) for n in spatial])]
