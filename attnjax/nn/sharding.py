"""Logical axes of the modules' parameters, for sharding a model by its parameters.

Every parameter of an :mod:`attnjax.nn` module names its axes with the logical names of
:mod:`attnjax.parallel` (``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``vocab``;
``None`` for an axis never sharded, such as a convolution's window). The names are Flax's
``out_sharding`` variable metadata, so ``nnx.get_partition_spec`` reads them, and
:func:`attnjax.parallel.param_shardings` maps them to a mesh by the library's one set of rules
(:data:`attnjax.parallel.DEFAULT_RULES`, or yours). Creating a module needs no mesh: the
metadata is recorded, not applied (``eager_sharding=False``); placement happens when the state
is put on devices.

>>> from flax import nnx
>>> lin = nnx.Linear(4, 8, kernel_metadata=axes("embed", "mlp"), rngs=nnx.Rngs(0))
>>> nnx.get_partition_spec(nnx.state(lin))["kernel"].get_value()
P('embed', 'mlp')
"""

from __future__ import annotations

import jax
from flax import nnx


def axes(*names: str | None) -> dict:
    """Variable metadata naming a parameter's logical axes: pass it as a layer's
    ``kernel_metadata`` / ``bias_metadata`` / ``scale_metadata`` or to ``nnx.Param(value, **axes(...))``."""
    return {"out_sharding": tuple(names), "eager_sharding": False}


def param(value: jax.Array, *names: str | None) -> nnx.Param:
    """``nnx.Param(value)`` whose axes are ``names`` (one per axis of ``value``)."""
    if len(names) != value.ndim:
        raise ValueError(f"logical axes {names} do not match a parameter of shape {value.shape}")
    return nnx.Param(value, **axes(*names))


def linear(
    in_features: int,
    out_features: int,
    names: tuple[str | None, str | None],
    *,
    use_bias: bool = True,
    **kwargs,
) -> nnx.Linear:
    """``nnx.Linear`` whose kernel has logical axes ``names`` (``[in, out]``) and bias ``names[1]``."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_metadata=axes(*names),
        bias_metadata=axes(names[1]),
        **kwargs,
    )


def layer_norm(features: int, name: str | None = "embed", **kwargs) -> nnx.LayerNorm:
    """``nnx.LayerNorm`` whose scale and bias have the logical axis ``name``."""
    return nnx.LayerNorm(features, scale_metadata=axes(name), bias_metadata=axes(name), **kwargs)


def rms_norm(features: int, name: str | None = "embed", **kwargs) -> nnx.RMSNorm:
    """``nnx.RMSNorm`` whose scale has the logical axis ``name``."""
    return nnx.RMSNorm(features, scale_metadata=axes(name), **kwargs)


def depthwise_conv(features: int, kernel: tuple[int, ...], name: str | None, **kwargs) -> nnx.Conv:
    """A depthwise ``nnx.Conv`` (``feature_group_count=features``, ``SAME`` padding) whose
    channel axis is ``name`` (its window axes are never sharded)."""
    window = (None,) * len(kernel)
    return nnx.Conv(
        features,
        features,
        kernel,
        feature_group_count=features,
        padding="SAME",
        kernel_metadata=axes(*window, None, name),
        bias_metadata=axes(name),
        **kwargs,
    )


def unannotated(module: nnx.Module) -> list[str]:
    """The paths of ``module``'s parameters whose logical axes are missing or of the wrong length
    (what a test asserts is empty)."""
    bad = []
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        if not names or len(names) != var.get_value().ndim:
            bad.append("/".join(map(str, path)))
    return bad


__all__ = ["axes", "depthwise_conv", "layer_norm", "linear", "param", "rms_norm", "unannotated"]
