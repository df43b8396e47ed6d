"""The ``pallas`` implementation of :func:`attnjax.ops.neighborhood_attention`: the flash
template of :mod:`kernels_pallas.flash` (the one block-sparse kernel), driven by the
neighborhood mask's tile order.

Tokens are permuted tile by tile, so that each kernel tile of ``prod(tile)`` consecutive
positions is one multi-dimensional tile of the grid; the block map of the permuted mask
(:class:`attnjax.masks.TiledNeighborhood`) is then exact and mostly EMPTY or FULL, and the kernel
visits only the tiles a window touches (work proportional to the window, as NATTEN's kernels).

On TPU (``attnjax.core.platform.current() == "tpu"``) the same permuted problem runs on
:mod:`kernels_pallas.flash.tpu`, whose tiles must be multiples of 128 tokens: the generic
default spatial tiles (64, 8x8, 4x4x4) are replaced by :data:`TPU_SPATIAL_TILES` (128, 16x8,
8x4x4), so the kernel tile is still exactly one spatial tile; a caller's own spatial tile whose
volume is not a multiple of 128 declines (NotImplementedError, so dispatch falls back to xla).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from attnjax import _layout
from attnjax.core import blocks, platform
from attnjax.core.blocks import BlockSizes
from attnjax.core.tiling import Dims, Problem
from attnjax.masks.neighborhood import Neighborhood, TiledNeighborhood
from attnjax.normalizers import softmax

TPU_SPATIAL_TILES: dict[int, tuple[int, ...]] = {1: (128,), 2: (16, 8), 3: (8, 4, 4)}
"""Spatial tiles of the TPU kernel by number of axes: 128 tokens each, the TPU flash kernel's
smallest tile (lanes and MXU width); the last axis, the fastest in memory, gets the fewest."""


def tpu_spatial_tile(tile: tuple[int, ...], spatial: tuple[int, ...]) -> tuple[int, ...]:
    """The spatial tile on TPU: the caller's if its volume is a multiple of 128; the TPU default
    in place of the generic default (a grid smaller than the tile is padded, never attended)."""
    if math.prod(tile) % 128 == 0:
        return tile
    if tile == blocks.spatial_tile(None, spatial):
        return TPU_SPATIAL_TILES[len(spatial)]
    raise NotImplementedError(
        f"the TPU neighborhood kernel needs a spatial tile of a multiple of 128 tokens; got {tile}")


def neighborhood_attention(q, k, v, mask: Neighborhood, scale: float, tile: tuple[int, ...]):
    """``q [B, *spatial, H, D]``, ``k/v [B, *spatial, K, D/E]`` -> ``[B, *spatial, H, E]``."""
    # imported lazily (Pallas is heavy to import), from wherever the kernels are (attnjax._layout)
    flash_attention = _layout.folder("kernels_pallas.flash").flash_attention

    spatial = mask.spatial_shape
    if platform.current() == "tpu":
        tile = tpu_spatial_tile(tuple(tile), tuple(spatial))
    tiled = TiledNeighborhood(mask.axes, tile)
    grid = tiled.grid
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
