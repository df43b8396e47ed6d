"""Every attnjax.nn module names the logical axes of all its parameters, so
attnjax.parallel.param_shardings can place any model built from them."""

from __future__ import annotations

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from attnjax import nn, parallel
from attnjax.nn import sharding

MODULES = {
    "mha": lambda r: nn.MultiHeadAttention(
        4, 16, num_kv_heads=2, qk_norm=True, output_gate=True, use_bias=True, rngs=r
    ),
    "block_hybrid": lambda r: nn.TransformerBlock(16, 4, norm="hybrid", layer_scale=0.1, rngs=r),
    "agent": lambda r: nn.AgentAttention(2, 16, agents=(2, 2), rngs=r),
    "moh": lambda r: nn.MoHAttention(4, 16, num_shared_heads=1, top_k=2, rngs=r),
    "mega": lambda r: nn.MegaLayer(16, ema_dim=4, qk_dim=8, rngs=r),
    "multi_token": lambda r: nn.MultiTokenAttention(4, 16, kernel=(2, 3), rngs=r),
    "selective": lambda r: nn.SelectiveAttention(4, 16, num_kv_heads=2, rngs=r),
    "routing": lambda r: nn.RoutingAttention(2, 16, num_clusters=2, rngs=r),
    "maxvit": lambda r: nn.MaxViTBlock(2, 16, window=2, grid=2, rngs=r),
    "l2vit": lambda r: nn.L2ViTBlockPair(2, 16, window=2, rngs=r),
}
# zoo part 4 (issue 23): set, graph and classic attention layers
MODULES.update({
    "set_isab": lambda r: nn.ISAB(16, 16, 2, 4, ln=True, rngs=r),
    "set_pma": lambda r: nn.PMA(16, 2, 2, ln=True, rngs=r),
    "gat": lambda r: nn.GraphAttention(16, 4, 2, version=2, rngs=r),
    "fit": lambda r: nn.FITBlock(16, 2, group_size=4, rngs=r),
    "additive": lambda r: nn.AdditiveAttention(16, 16, 8, num_heads=2, rngs=r),
    "bidaf": lambda r: nn.BiDAFAttention(16, rngs=r),
    "probe": lambda r: nn.EfficientProbe(16, 2, rngs=r),
    "mil": lambda r: nn.GatedMILPooling(16, 8, branches=2, rngs=r),
    "label": lambda r: nn.LabelAttention(16, 2, 8, rngs=r),
})


@pytest.mark.parametrize("name", MODULES)
def test_every_parameter_has_logical_axes(name):
    model = MODULES[name](nnx.Rngs(0))
    assert sharding.unannotated(model) == []
    # and the names are ones the rules know
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        for axis in var.get_metadata()["out_sharding"]:
            assert axis is None or axis in parallel.LOGICAL_AXES


def test_partition_specs_of_the_projections():
    model = nn.MultiHeadAttention(4, 16, num_kv_heads=2, use_bias=True, rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert specs["query"]["kernel"].get_value() == P("embed", "heads", "head_dim")
    assert specs["key"]["kernel"].get_value() == P("embed", "kv_heads", "head_dim")
    assert specs["key"]["bias"].get_value() == P("kv_heads", "head_dim")
    assert specs["out"]["kernel"].get_value() == P("heads", "head_dim", "embed")
    assert specs["out"]["bias"].get_value() == P("embed")
    # Creating a module needs no mesh (the metadata is recorded, not applied) ...
    mesh = parallel.make_mesh({"fsdp": 1, "tensor": 1}, jax.devices()[:1])
    shardings = parallel.param_shardings(nnx.state(model, nnx.Param), mesh)
    assert shardings["out"]["kernel"].get_value().spec == P("tensor", None, "fsdp")
    # ... and custom rules replace the defaults (here: no FSDP, heads over a "model" axis).
    mesh = parallel.make_mesh({"model": 1}, jax.devices()[:1])
    rules = {"heads": "model", "kv_heads": "model", "embed": None}
    shardings = parallel.param_shardings(nnx.state(model, nnx.Param), mesh, rules)
    assert shardings["query"]["kernel"].get_value().spec == P(None, "model", None)
