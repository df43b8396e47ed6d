"""Deformable DETR's multi-scale deformable attention module (Zhu et al., ICLR 2021).

Letter legend: B batch, T queries, N value pixels over all levels, C features, M heads,
L levels, K points.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, ops
from attnjax.nn.layers import projection_axes


def ring_init(heads: int, levels: int, points: int):
    """Deformable DETR's offset bias: head ``m`` points along the angle ``2 pi m / M`` (scaled so
    the larger coordinate is 1), point ``k`` at ``k + 1`` times that, on every level."""

    def init(key, shape, dtype=jnp.float32):
        theta = jnp.arange(heads, dtype=jnp.float32) * (2 * math.pi / heads)
        grid = jnp.stack([jnp.cos(theta), jnp.sin(theta)], -1)
        grid = grid / jnp.abs(grid).max(-1, keepdims=True)  # [M, 2]
        scale = jnp.arange(1, points + 1, dtype=jnp.float32)[:, None]  # [K, 1]
        out = grid[:, None, None, :] * scale[None, None]  # [M, 1, K, 2]
        return jnp.broadcast_to(out, (heads, levels, points, 2)).reshape(shape).astype(dtype)

    return init


class MSDeformableAttention(nnx.Module):
    r"""Multi-scale deformable attention: each query samples ``K`` points per level and head
    around its reference point and averages them with softmax weights.

    .. math::

        \mathrm{out}_q = W_O \Big[\sum_{l,k} A_{q m l k}\, (W_V x^l)_m\big(p_q + \Delta p_{q m l k} / (w_l, h_l)\big)\Big]_m,
        \quad \Delta p = W^{\Delta} z_q, \quad A = \mathrm{softmax}_{(l, k)}(W^A z_q)

    :func:`attnjax.ops.deformable_attention` does the sampling. Offsets are in pixels of each
    level (the official normalizer ``(w_l, h_l)``); :math:`W^\Delta` starts at zero with the ring
    bias (:func:`ring_init`), :math:`W^A` at zero (uniform weights), as the official init.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.MSDeformableAttention(2, 8, num_levels=2, num_points=3, rngs=nnx.Rngs(0))
    >>> shapes = [(4, 5), (2, 3)]
    >>> value = jnp.ones((1, 26, 8))
    >>> ref = jnp.full((1, 7, 2), 0.5)                   # reference points, normalized (x, y)
    >>> m(jnp.ones((1, 7, 8)), ref, value, shapes).shape
    (1, 7, 8)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        num_levels: int = 4,
        num_points: int = 4,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        M, C, _ = _checks.head_features(num_heads, in_features)
        L = _checks.positive_int("num_levels", num_levels)
        K = _checks.positive_int("num_points", num_points)
        self.num_heads, self.num_levels, self.num_points, self.in_features = M, L, K, C
        self.implementation = implementation
        zeros = nnx.initializers.zeros
        lin = lambda out, names, **kw: nnx.LinearGeneral(
            C, out, dtype=dtype, rngs=rngs, **projection_axes("embed", *names), **kw
        )
        self.sampling_offsets = lin(
            (M, L, K, 2), ("heads", None, None, None), kernel_init=zeros, bias_init=ring_init(M, L, K)
        )
        self.attention_weights = lin((M, L, K), ("heads", None, None), kernel_init=zeros, bias_init=zeros)
        xavier = nnx.initializers.xavier_uniform()
        self.value_proj = lin((M, C // M), ("heads", "head_dim"), kernel_init=xavier, bias_init=zeros)
        self.output_proj = nnx.LinearGeneral(
            (M, C // M),
            C,
            axis=(-2, -1),
            dtype=dtype,
            rngs=rngs,
            kernel_init=xavier,
            bias_init=zeros,
            **projection_axes("heads", "head_dim", "embed", inputs=2),
        )

    def __call__(
        self,
        query: Float[Array, "B T C"],
        reference_points: Float[Array, "B T L 2"] | Float[Array, "B T 2"],
        value: Float[Array, "B N C"],
        shapes,
        value_mask=None,
    ) -> Float[Array, "B T C"]:
        """``reference_points`` are normalized ``(x, y)`` in ``[0, 1]``, per level or shared;
        ``value`` holds every level's pixels (row-major, level after level) with ``shapes`` their
        ``(h_l, w_l)``; ``value_mask [B, N]`` (True = keep) zeroes padded pixels."""
        B, T, C = _checks.check_rank("query", query, ("batch", "queries", "features"))
        if C != self.in_features:
            raise ValueError(f"query has {C} features; the module was built for {self.in_features}")
        if len(shapes) != self.num_levels:
            raise ValueError(f"shapes has {len(shapes)} levels; the module was built for {self.num_levels}")
        ref = jnp.asarray(reference_points)
        if ref.ndim == 3:
            ref = jnp.broadcast_to(ref[:, :, None], (B, T, self.num_levels, 2))
        if ref.shape != (B, T, self.num_levels, 2):
            raise ValueError(
                f"reference_points must be [B, T, L={self.num_levels}, 2] or [B, T, 2]; got {ref.shape}"
            )
        v = self.value_proj(value)
        if value_mask is not None:
            v = jnp.where(value_mask[..., None, None], v, 0)
        normalizer = jnp.asarray([(w, h) for h, w in shapes], jnp.float32)  # [L, 2]: (x, y) sizes
        offsets = self.sampling_offsets(query)  # [B, T, M, L, K, 2]
        locations = ref[:, :, None, :, None, :].astype(jnp.float32) + offsets / normalizer[:, None, :]
        out = ops.deformable_attention(
            v,
            shapes,
            locations.astype(v.dtype),
            self.attention_weights(query),
            implementation=self.implementation,
        )
        return self.output_proj(out)


__all__ = ["MSDeformableAttention", "ring_init"]
