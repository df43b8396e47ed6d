"""Sharding a model by its parameters' logical axes: a tensor=2 x fsdp=4 training step on 8
simulated CPU devices equals the single-device step, and the compiled program really holds
the projection weights in pieces (FSDP over model features, tensor parallelism over heads)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax import masks, nn, ops, parallel

C, H, T, B = 16, 4, 8, 8  # fsdp=4 divides C and B; tensor=2 divides H and the MLP's 32 hidden features


def _model():
    attention_fn = functools.partial(ops.attention, implementation="reference")
    return nn.TransformerBlock(
        C, H, attention_fn=attention_fn, mask=masks.causal(), mlp_ratio=2.0, rngs=nnx.Rngs(0)
    )


def _step(graphdef, rest):
    def loss_fn(params, batch):
        y = nnx.merge(graphdef, params, rest)(batch["x"])
        return jnp.mean((y - batch["y"]) ** 2)

    def step(params, batch):  # plain SGD: its update is linear in the gradient (Adam's 1/|g| is not)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss

    return step


def _batch():
    kx, ky = jax.random.split(jax.random.key(1))
    return {"x": jax.random.normal(kx, (B, T, C)), "y": jax.random.normal(ky, (B, T, C))}


def test_tensor_times_fsdp_step_equals_single_device_step():
    graphdef, params, rest = nnx.split(_model(), nnx.Param, ...)
    step = _step(graphdef, rest)
    batch = _batch()

    one = jax.devices()[0]
    want_params, want_loss = jax.jit(step)(jax.device_put(params, one), jax.device_put(batch, one))

    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    p_sh = parallel.param_shardings(params, mesh)
    b_sh = {k: parallel.sharding(mesh, ("batch", "sequence", None)) for k in batch}
    sharded = jax.jit(step, in_shardings=(p_sh, b_sh), out_shardings=(p_sh, NamedSharding(mesh, P())))
    args = (jax.device_put(params, p_sh), jax.device_put(batch, b_sh))
    got_params, got_loss = sharded(*args)

    # Sharding only reorders float32 sums (partial sums per device, then all-reduce): a
    # difference of a few float32 roundings of the largest value, far below any real bug.
    tol = lambda ref: 64 * np.finfo(np.float32).eps * max(float(jnp.max(jnp.abs(ref))), 1e-6)
    np.testing.assert_allclose(got_loss, want_loss, rtol=0, atol=tol(want_loss))
    flat_got, flat_want = nnx.to_flat_state(got_params), nnx.to_flat_state(want_params)
    for (path, g), (_, w) in zip(flat_got, flat_want):
        g, w = np.asarray(g.get_value()), np.asarray(w.get_value())
        np.testing.assert_allclose(g, w, rtol=0, atol=tol(w), err_msg="/".join(map(str, path)))

    # The placement follows the logical axes: query kernel (embed, heads, head_dim) -> (fsdp, tensor, -),
    # output kernel (heads, head_dim, embed) -> (tensor, -, fsdp), MLP (embed, mlp) and (mlp, embed).
    spec = lambda *path: tuple(got_params[path[0]][path[1]][path[2]].get_value().sharding.spec)
    assert spec("attention", "query", "kernel") == ("fsdp", "tensor", None)
    assert spec("attention", "key", "kernel") == ("fsdp", "tensor", None)
    assert spec("attention", "out", "kernel") == ("tensor", None, "fsdp")
    assert spec("mlp", "fc1", "kernel") == ("fsdp", "tensor")
    assert spec("mlp", "fc2", "kernel") == ("tensor", "fsdp")

    # The compiled (SPMD-partitioned) program takes each device's piece: the entry parameters
    # are the per-device shapes, [C/4, H/2, D] for q/k/v kernels and [H/2, D, C/4] for out.
    hlo = sharded.lower(*args).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    entry = entry[: entry.index("\n}")]
    shapes = re.findall(r"(f32\[[\d,]*\])\S* parameter\(", entry)
    D = C // H
    assert shapes.count(f"f32[{C // 4},{H // 2},{D}]") == 3, shapes  # query, key, value kernels
    assert f"f32[{H // 2},{D},{C // 4}]" in shapes, shapes  # output projection kernel
    assert f"f32[{C},{H},{D}]" not in shapes, "a projection kernel is not sharded"


def test_rules_keep_indivisible_axes_and_mesh_axes_used_once():
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    assert parallel.spec(("embed", "heads", "head_dim"), mesh=mesh, shape=(16, 4, 4)) == P(
        "fsdp", "tensor", None
    )
    assert parallel.spec(("embed", "heads", "head_dim"), mesh=mesh, shape=(6, 4, 4)) == P(
        None, "tensor", None
    )
    # batch and embed both ask for fsdp: the first axis gets it
    assert parallel.spec(("batch", "sequence", "embed")) == P(("data", "fsdp"), "context", None)
    with pytest.raises(ValueError, match="do not match an array of shape"):
        parallel.spec(("embed",), shape=(2, 3))
