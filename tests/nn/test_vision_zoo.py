"""The zoo part 1 vision NNX modules: each equals its op on its own projections (and trains),
their parameters name logical axes, and the known answers of the specs (DPB depends only on
the offset, CrossViT changes only the CLS, TNT's fusion, BoxRPB's box, deformable sampling at the
reference point)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import nn, ops, parallel, score_mods
from attnjax.nn import sharding
from tests import harness

MAP = harness.normal(jax.random.key(0), (2, 6, 6, 8))


def zero(module, *names):
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if not names or any(n in map(str, path) for n in names):
            var.set_value(jnp.zeros_like(var.get_value()))
    return module


MODULES = {
    "deformable": lambda r: nn.MSDeformableAttention(2, 8, num_levels=2, num_points=2, rngs=r),
    "halo": lambda r: nn.HaloAttention(2, 8, block=3, halo=1, rngs=r),
    "crossformer": lambda r: nn.CrossFormerBlock(2, 8, group=3, kind="lda", rngs=r),
    "gc_query": lambda r: nn.GCViTGlobalQuery(8, 2, levels=1, rngs=r),
    "gc_attn": lambda r: nn.GlobalWindowAttention(2, 8, window=3, rngs=r),
    "area": lambda r: nn.AreaAttention(2, 8, area=2, rngs=r),
    "vsa": lambda r: nn.VSAWindowAttention(2, 8, window=3, rngs=r),
    "vwa": lambda r: nn.VaryingWindowAttention(2, 8, window=3, ratios=(1, 3), rngs=r),
    "catanet": lambda r: nn.CATANetAttention(2, 8, num_centers=3, group=4, rngs=r),
    "davit_channel": lambda r: nn.DaViTBlock(2, 8, kind="channel", rngs=r),
    "davit_spatial": lambda r: nn.DaViTBlock(2, 8, kind="spatial", window=3, rngs=r),
    "crossvit": lambda r: nn.CrossViTFusion(8, 12, num_heads=2, rngs=r),
    "tnt": lambda r: nn.TNTBlock(8, 4, words=4, outer_heads=2, inner_heads=2, rngs=r),
    "boxrpb": lambda r: nn.BoxRPBCrossAttention(2, 8, hidden=4, rngs=r),
}


@pytest.mark.parametrize("name", MODULES)
def test_every_parameter_has_logical_axes(name):
    model = MODULES[name](nnx.Rngs(0))
    assert sharding.unannotated(model) == []
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert all(a is None or a in parallel.LOGICAL_AXES for a in var.get_metadata()["out_sharding"])


def test_windowed_modules_are_their_ops():
    loss = lambda m, x: jnp.mean(m(x) ** 2)
    halo = nn.HaloAttention(2, 8, block=3, halo=1, rngs=nnx.Rngs(0))
    harness.check_module_is_op(
        halo,
        (MAP,),
        lambda m, x: [
            (
                m(x),
                m.out(
                    ops.halo_attention(
                        *harness.projections(m, x),
                        block=3,
                        halo=1,
                        rel_row=m.rel_row[...],
                        rel_col=m.rel_col[...],
                    )
                ),
            )
        ],
        what="halo",
        loss=loss,
    )
    for kind, op, kw in (
        ("sda", ops.block_attention, {"window": 3}),
        ("lda", ops.grid_attention, {"grid": 3}),
    ):
        cf = nn.CrossFormerAttention(2, 8, group=3, kind=kind, rngs=nnx.Rngs(1))
        harness.check_module_is_op(
            cf,
            (MAP,),
            lambda m, x, op=op, kw=kw: [
                (
                    m(x),
                    m.out(
                        op(
                            *harness.projections(m, x),
                            score_mod=score_mods.relative_bias_2d(m.pos.table(3), 3),
                            **kw,
                        )
                    ),
                )
            ],
            what=kind,
            loss=loss,
        )
    area = nn.AreaAttention(2, 8, area=3, rngs=nnx.Rngs(2))
    assert area(MAP).shape == MAP.shape


def test_dynamic_position_bias_depends_only_on_the_offset():
    dpb = nn.DynamicPosBias(4, 2, residual=True, rngs=nnx.Rngs(0))
    table = dpb.table(3)
    assert table.shape == (2, 5, 5)
    # entry (G-1+dy, G-1+dx) is the MLP at the query-minus-key offset (-dy, -dx), as the official code
    np.testing.assert_allclose(table[:, 2 + 1, 2 - 2], dpb(jnp.array([-1.0, 2.0])), rtol=1e-5)
    # a Swin-style lookup in its place: relative_bias_2d reads the same entries for equal offsets
    mod = score_mods.relative_bias_2d(table, 3)
    i = jnp.arange(9)
    bias = mod(9, 9, jnp.zeros((1, 2, 9, 9)), 0, jnp.arange(2)[None, :, None, None], i[:, None], i[None])[0]
    assert np.allclose(bias[:, 0, 4], bias[:, 4, 8]) and np.allclose(bias[:, 1, 3], bias[:, 5, 7])


def test_gcvit_global_query_and_window_attention():
    gen = nn.GCViTGlobalQuery(8, 2, levels=1, rngs=nnx.Rngs(0))
    qg = gen(MAP)
    assert qg.shape == (2, 3, 3, 2, 4)
    attn = nn.GlobalWindowAttention(2, 8, window=3, rngs=nnx.Rngs(1))
    harness.check_module_is_op(
        attn,
        (MAP, qg),
        lambda m, x, q: [
            (
                m(x, q),
                m.out(
                    ops.window_cross_attention(
                        q,
                        m.key(x),
                        m.value(x),
                        window=3,
                        score_mod=score_mods.relative_bias_2d(m.rel_table[...], 3),
                    )
                ),
            )
        ],
        what="gcvit",
        loss=lambda m, x, q: jnp.mean(m(x, q) ** 2),
    )


def test_vsa_module_starts_as_window_attention():
    m = nn.VSAWindowAttention(2, 8, window=3, rngs=nnx.Rngs(0))  # zero-initialized regressor
    harness.check_module_is_op(
        m,
        (MAP,),
        lambda m, x: [
            (
                m(x),
                m.out(
                    ops.block_attention(
                        *harness.projections(m, x),
                        window=3,
                        score_mod=score_mods.relative_bias_2d(m.rel_table[...], 3),
                    )
                ),
            )
        ],
        what="vsa",
        loss=lambda m, x: jnp.mean(m(x) ** 2),
    )
