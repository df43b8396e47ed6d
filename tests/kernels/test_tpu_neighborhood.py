"""Neighborhood attention on the TPU flash kernels (``attnjax/ops/neighborhood/pallas.py`` under
``platform.target("tpu", interpret=True)``: tile-permuted tokens, the ``TiledNeighborhood`` mask, TPU spatial
tiles of 128 tokens) against the dense reference, values and gradients, in TPU interpret mode.

Only ``implementation="pallas"`` is allowed, so a kernel that declined would fail the test rather
than fall back. Lowering and compiling for v5e: ``test_tpu_lowering.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnjax import ops
from attnjax.core import platform
from attnjax.ops.neighborhood import pallas as nb_pallas
from tests import harness

# Tiny grids: each crosses several TPU spatial tiles (128, 16x8, 8x4x4) or pads a partial one.
CASES = {
    "1d-300-k33-d2": ((300,), dict(kernel_size=33, dilation=2)),
    "2d-20x12-k5x3-d2x1": ((20, 12), dict(kernel_size=(5, 3), dilation=(2, 1))),
    "3d-9x6x5-k3-causal": ((9, 6, 5), dict(kernel_size=3, is_causal=(True, False, False))),
    "2d-24x10-k7x4-s2x2-causal": ((24, 10), dict(kernel_size=(7, 4), stride=(2, 2), is_causal=True)),
}
FAST = {"1d-300-k33-d2", "3d-9x6x5-k3-causal"}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _qkv(spatial, H=2, K=1, D=32):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return (harness.normal(kq, (1, *spatial, H, D)), harness.normal(kk, (1, *spatial, K, D)),
            harness.normal(kv, (1, *spatial, K, D)))


@pytest.mark.parametrize("case, dtype", [
    pytest.param(case, dtype, id=f"{case}-{dtype}", marks=() if case in FAST and dtype == "f32" else pytest.mark.slow)
    for case in CASES for dtype in DTYPES])
def test_tpu_neighborhood_matches_reference(case, dtype):
    spatial, kw = CASES[case]
    op = lambda impl: lambda q, k, v: ops.neighborhood_attention(q, k, v, implementation=impl, **kw)
    with platform.target("tpu", interpret=True):
        harness.check_vjp(op("pallas"), op("reference"), _qkv(spatial), DTYPES[dtype], what=f"tpu {case}")


def test_tpu_spatial_tiles():
    """The generic defaults become 128-token TPU tiles; a caller's tile of 128k tokens is kept."""
    assert nb_pallas.tpu_spatial_tile((64,), (300,)) == (128,)
    assert nb_pallas.tpu_spatial_tile((8, 8), (20, 12)) == (16, 8)
    assert nb_pallas.tpu_spatial_tile((4, 4, 4), (9, 6, 5)) == (8, 4, 4)
    assert nb_pallas.tpu_spatial_tile((4, 8), (4, 10)) == (16, 8)  # the default clipped to a small grid
    assert nb_pallas.tpu_spatial_tile((32, 8), (64, 64)) == (32, 8)


def test_tpu_neighborhood_declines_odd_spatial_tiles():
    q = jnp.zeros((1, 16, 16, 2, 32))
    with platform.target("tpu", interpret=True), pytest.raises(NotImplementedError, match="multiple of 128"):
        ops.neighborhood_attention(q, q, q, kernel_size=3, implementation="pallas",
                                   block_sizes=ops.BlockSizes(spatial=(4, 4)))
