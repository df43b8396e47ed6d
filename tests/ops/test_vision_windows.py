"""Zoo part 1, windowed vision ops: HaloNet halo attention, block/grid attention with a 2-D
relative bias (CrossFormer / Swin), GC ViT's global-query window attention and YOLOv12's area
attention, each against its dense masked reference (values and gradients, f32 and bf16, odd
sizes) plus the known answers of the specs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import ops, score_mods
from tests import harness

F32, BF16 = jnp.float32, jnp.bfloat16


def grid_qkv(B=2, h=6, w=9, H=2, K=2, D=5, E=3, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        harness.normal(kq, (B, h, w, H, D)),
        harness.normal(kk, (B, h, w, K, D)),
        harness.normal(kv, (B, h, w, K, E)),
    )


# -- 1.1 HaloNet --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, attend_padding",
    [(F32, False), (F32, True), pytest.param(BF16, False, marks=pytest.mark.slow)],
    ids=["f32-masked", "f32-timm", "bf16-masked"],
)
def test_halo_windows_equal_dense_reference(dtype, attend_padding):
    q, k, v = grid_qkv(K=1)  # GQA
    n = 3 + 2 * 1
    r = 0.3 * jax.random.normal(jax.random.key(3), (2, 2 * n - 1, 5))
    op = lambda impl: (
        lambda q, k, v, rr, rc: ops.halo_attention(
            q,
            k,
            v,
            block=3,
            halo=1,
            rel_row=rr,
            rel_col=rc,
            attend_padding=attend_padding,
            implementation=impl,
        )
    )
    harness.check_vjp(op("xla"), op("reference"), (q, k, v, r[0], r[1]), dtype)


def test_halo_known_answers():
    q, k, v = grid_qkv()
    # halo 0 is block attention; a halo covering the grid is full attention (padding masked)
    np.testing.assert_allclose(
        ops.halo_attention(q, k, v, block=3, halo=0),
        ops.block_attention(q, k, v, window=3),
        rtol=1e-5,
        atol=1e-6,
    )
    flat = lambda x: x.reshape(2, 54, *x.shape[3:])
    full = ops.attention(flat(q), flat(k), flat(v), implementation="reference").reshape(2, 6, 9, 2, 3)
    np.testing.assert_allclose(
        ops.halo_attention(q, k, v, block=3, halo=9, implementation="reference"), full, rtol=1e-5, atol=1e-6
    )
    # the mask: block (0, 1) of side 3 with halo 1 sees rows/cols 2..6 of the image
    allowed = ops.halo_mask(3, 1, (6, 9), padded=False).materialize(54, 54)[0, 0]
    ky, kx = np.divmod(np.flatnonzero(np.asarray(allowed[1 * 9 + 4])), 9)
    assert set(ky) == {0, 1, 2, 3} and set(kx) == {2, 3, 4, 5, 6}


def test_halo_errors():
    q, k, v = grid_qkv()
    with pytest.raises(ValueError, match="divide"):
        ops.halo_attention(q, k, v, block=4, halo=1)
    with pytest.raises(ValueError, match="together"):
        ops.halo_attention(q, k, v, block=3, halo=1, rel_row=jnp.zeros((9, 5)))
    with pytest.raises(ValueError, match="rel_row"):
        ops.halo_attention(q, k, v, block=3, halo=1, rel_row=jnp.zeros((8, 5)), rel_col=jnp.zeros((8, 5)))


# -- 1.4 CrossFormer LSDA with a (dynamic) relative bias -----------------------------------------


@pytest.mark.parametrize(
    "op, dtype",
    [("block", F32), ("grid", F32), pytest.param("block", BF16, marks=pytest.mark.slow)],
    ids=["sda-f32", "lda-f32", "sda-bf16"],
)
def test_multi_axis_relative_bias_matches_reference(op, dtype):
    q, k, v = grid_qkv()
    table = harness.normal(jax.random.key(4), (2, 5, 5))
    fn = ops.block_attention if op == "block" else ops.grid_attention
    kw = {"window": 3} if op == "block" else {"grid": 3}
    f = lambda impl: (
        lambda q, k, v, t: fn(q, k, v, score_mod=score_mods.relative_bias_2d(t, 3), implementation=impl, **kw)
    )
    harness.check_vjp(f("xla"), f("reference"), (q, k, v, table), dtype)


# -- 1.6 GC ViT -----------------------------------------------------------------------------------


def test_window_cross_attention_matches_reference_and_local_attention():
    q, k, v = grid_qkv(h=6, w=6)
    qg = q[:, :3, :3]
    table = harness.normal(jax.random.key(4), (2, 5, 5))
    f = lambda impl: (
        lambda qg, k, v, t: ops.window_cross_attention(
            qg, k, v, window=3, score_mod=score_mods.relative_bias_2d(t, 3), implementation=impl
        )
    )
    harness.check_vjp(f("xla"), f("reference"), (qg, k, v, table), F32)
    # the global query equal to the windows' own (identical) queries is local window attention
    tiled = jnp.tile(qg, (1, 2, 2, 1, 1))
    np.testing.assert_allclose(
        ops.window_cross_attention(qg, k, v, window=3),
        ops.block_attention(tiled, k, v, window=3),
        rtol=1e-6,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="window"):
        ops.window_cross_attention(q[:, :2, :3], k, v, window=3)


# -- 1.2 area attention ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, pytest.param(BF16, marks=pytest.mark.slow)], ids=["f32", "bf16"])
def test_area_attention_matches_chunked_reference(dtype):
    q, k, v = (x.reshape(2, 54, *x.shape[3:]) for x in grid_qkv(K=1))
    f = lambda impl: lambda q, k, v: ops.area_attention(q, k, v, area=3, implementation=impl)
    harness.check_vjp(f("xla"), f("reference"), (q, k, v), dtype)


def test_area_attention_known_answers():
    q, k, v = grid_qkv()
    flat = lambda x: x.reshape(2, 54, *x.shape[3:])
    np.testing.assert_allclose(
        ops.area_attention(flat(q), flat(k), flat(v), area=1),
        ops.attention(flat(q), flat(k), flat(v)),
        rtol=1e-5,
        atol=1e-6,
    )
    # area = h: each image row attends within itself (block attention with 1 x w windows)
    rows = ops.block_attention(q, k, v, window=(1, 9)).reshape(2, 54, 2, 3)
    np.testing.assert_allclose(
        ops.area_attention(flat(q), flat(k), flat(v), area=6), rows, rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="area"):
        ops.area_attention(flat(q), flat(k), flat(v), area=5)
