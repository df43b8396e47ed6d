"""Shared pieces of the CNN attention modules: convolutions and norms whose parameters name
their logical axes, channel-last ``[B, h, w, C]`` throughout.

Norms default to ones without batch statistics (the L2ViT precedent): ``"layer"`` (over the
channels), ``"group"``, ``"instance"``; ``"batch"`` (``nnx.BatchNorm``, running statistics, train /
eval through ``model.train()`` / ``model.eval()``) is there for parity with official weights;
``None`` for no norm. A norm over a single channel would erase it, so the one-channel gates
(spatial attention maps) default to ``None``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.sharding import axes, param

NORMS = (None, "layer", "group", "instance", "batch")


def conv(
    c_in: int,
    c_out: int,
    kernel: int | tuple[int, ...],
    *,
    groups: int = 1,
    use_bias: bool = True,
    names: tuple[str | None, str | None] = (None, "embed"),
    dtype=None,
    rngs: nnx.Rngs,
    **kwargs,
) -> nnx.Conv:
    """``nnx.Conv`` with ``SAME`` padding; the kernel's channel axes are ``names`` (window axes
    never sharded)."""
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    return nnx.Conv(
        c_in,
        c_out,
        kernel,
        feature_group_count=groups,
        padding="SAME",
        use_bias=use_bias,
        kernel_metadata=axes(*(None,) * len(kernel), *names),
        bias_metadata=axes(names[1]),
        dtype=dtype,
        rngs=rngs,
        **kwargs,
    )


def norm(
    kind: str | None,
    features: int,
    *,
    groups: int = 1,
    name: str | None = "embed",
    dtype=None,
    rngs: nnx.Rngs,
):
    """A norm over the last (channel) axis of a map; see the module docstring for the kinds."""
    meta = dict(scale_metadata=axes(name), bias_metadata=axes(name))
    if kind is None:
        return None
    if kind == "layer":
        return nnx.LayerNorm(features, dtype=dtype, rngs=rngs, **meta)
    if kind in ("group", "instance"):
        g = features if kind == "instance" else groups
        return nnx.GroupNorm(features, num_groups=g, dtype=dtype, rngs=rngs, **meta)
    if kind == "batch":
        return nnx.BatchNorm(features, dtype=dtype, rngs=rngs, **meta)
    raise ValueError(f"norm must be one of {NORMS}; got {kind!r}")


def apply(module, x):
    """``module(x)``, or ``x`` for a missing (``None``) module."""
    return x if module is None else module(x)


class PReLU(nnx.Module):
    """``max(x, 0) + a min(x, 0)`` with one learned slope (PyTorch's default ``nn.PReLU()``)."""

    def __init__(self, init: float = 0.25):
        self.slope = param(jnp.full((1,), init, jnp.float32), None)

    def __call__(self, x):
        return jnp.where(x >= 0, x, self.slope[...].astype(x.dtype) * x)


def zpool(x: jax.Array) -> jax.Array:
    """``[max_C x; mean_C x]``, ``[B, h, w, 2]`` (CBAM's ChannelPool / triplet's Z-pool)."""
    return jnp.concatenate([x.max(-1, keepdims=True), x.mean(-1, keepdims=True)], -1)
