"""``core.BlockSizes``: one owner of tile sizes. ``None`` and ``BlockSizes()`` mean the same on
every path; unset fields come from the one defaults table; backward tiles default to the
forward's; bad values are refused naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from attnjax import ops
from attnjax.core import blocks
from attnjax.core.blocks import BlockSizes
from kernels_pallas import backend


@pytest.mark.parametrize("family", ["xla", "flash", "lightning"])
@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_none_and_empty_block_sizes_resolve_alike(family, platform):
    resolved = BlockSizes().resolve(family, platform)
    assert all(getattr(resolved, f.name) is not None for f in dataclasses.fields(resolved) if f.name != "spatial")
    default = blocks.DEFAULTS.get((family, platform)) or blocks.DEFAULTS[(family, "any")]
    assert resolved.forward == default.forward
    assert resolved.dq == resolved.forward and resolved.dkv == resolved.forward


def test_set_fields_win_and_backward_tiles_follow_the_forward():
    bs = BlockSizes(block_q=32, block_k_dkv=128).resolve("flash", "gpu")
    assert bs.forward == (32, 64) and bs.dq == (32, 64) and bs.dkv == (32, 128)


def test_flash_tiles_are_clipped_alike_for_none_and_empty():
    assert backend.flash_tiles(40, 300, None) == backend.flash_tiles(40, 300, BlockSizes())
    tiles = backend.flash_tiles(40, 300, BlockSizes(block_q=256))
    assert tiles.block_q == 40 and tiles.block_q_dq == 40  # clipped to the 8-rounded length


def test_spatial_tile_defaults_by_rank_and_clips():
    assert blocks.spatial_tile(None, (100,)) == (64,)
    assert blocks.spatial_tile(BlockSizes(), (5, 30)) == (5, 8)
    assert blocks.spatial_tile(BlockSizes(spatial=(2, 16)), (5, 30)) == (2, 16)
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        blocks.spatial_tile(BlockSizes(spatial=(4,)), (5, 30))


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(block_q=0), ValueError, "BlockSizes.block_q"),
        (dict(block_k_dkv=-8), ValueError, "BlockSizes.block_k_dkv"),
        (dict(block_q_dq=16.0), TypeError, "BlockSizes.block_q_dq"),
        (dict(spatial=[8, 8]), TypeError, "BlockSizes.spatial"),
        (dict(spatial=(8, 0)), ValueError, r"BlockSizes.spatial\[1\]"),
    ],
    ids=["zero", "negative", "float", "list", "zero_axis"],
)
def test_bad_block_sizes_are_refused(kw, err, match):
    with pytest.raises(err, match=match):
        BlockSizes(**kw)


def test_block_sizes_argument_must_be_a_block_sizes():
    import jax.numpy as jnp

    x = jnp.ones((1, 8, 2, 4))
    with pytest.raises(TypeError, match="block_sizes must be an attnjax.ops.BlockSizes"):
        ops.attention(x, x, x, block_sizes=(16, 16))
    with pytest.raises(TypeError, match="block_sizes must be an attnjax.ops.BlockSizes"):
        ops.neighborhood_attention(x, x, x, kernel_size=3, block_sizes=(4,))
