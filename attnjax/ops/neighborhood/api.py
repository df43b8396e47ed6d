"""Neighborhood attention (NATTEN semantics) on 1-D, 2-D and 3-D grids of tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence

from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.core import blocks, dispatch
from attnjax.core.blocks import BlockSizes
from attnjax.core.dispatch import Implementation
from attnjax.core.utils import default_scale
from attnjax.masks.neighborhood import Neighborhood, axis_windows
from attnjax.ops.neighborhood import pallas, reference, xla

IntOrTuple = int | Sequence[int]


def neighborhood_attention(
    q: Float[Array, "B *spatial H D"],
    k: Float[Array, "B *spatial K D"],
    v: Float[Array, "B *spatial K E"],
    *,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    stride: IntOrTuple = 1,
    is_causal: bool | Sequence[bool] = False,
    scale: float | None = None,
    implementation: Implementation = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B *spatial H E"]:
    r"""Neighborhood attention: softmax attention where each query sees a window of keys around it.

    .. math::

        O_x = \sum_{y \in N(x)} \mathrm{softmax}_y\big(\mathrm{scale}\; q_x \cdot k_y\big)\, v_y

    where ``N(x)`` is the neighborhood of grid position ``x``: per spatial axis ``kernel_size``
    keys around it (clamped at the borders so every non-causal query sees exactly
    ``prod(kernel_size)`` keys), inside its dilation group, shared by runs of ``stride`` queries,
    and only at or before the query on causal axes. Semantics are NATTEN's ("Neighborhood
    Attention Transformer", Hassani et al. 2023; "Generalized Neighborhood Attention", 2025); the
    exact rule is in :mod:`attnjax.masks.neighborhood`. Causal is per axis and self-aligned (keys at or
    before the query's own coordinate; queries and keys share one grid, so there is no
    top-left/bottom-right question).

    Args:
      q: queries ``[B, *spatial, H, D]`` with 1 to 3 spatial axes.
      k: keys ``[B, *spatial, K, D]``; ``K`` divides ``H`` (grouped-query attention).
      v: values ``[B, *spatial, K, E]``.
      kernel_size: window size, an int or one per axis; ``kernel_size * dilation <= extent``.
      dilation: an int or one per axis (>= 1).
      stride: an int or one per axis, ``1 <= stride <= kernel_size``; ``stride == kernel_size``
        is blocked attention.
      is_causal: a bool or one per axis.
      scale: logit scale; default ``1 / sqrt(D)``.
      implementation: ``None``, ``"reference"`` (dense with the mask), ``"xla"`` (tiles of
        queries against their key halos: cost follows the window), ``"pallas"`` (block-sparse
        kernel) or a sequence of them tried in order.
      block_sizes: ``BlockSizes(spatial=...)``, the query tile shape of the ``xla`` and
        ``pallas`` paths (one entry per spatial axis; default 64, 8x8 or 4x4x4).

    Returns:
      ``[B, *spatial, H, E]`` in ``q.dtype``.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 12, 10, 2, 8))
    >>> out = ops.neighborhood_attention(q, k, v, kernel_size=(5, 3), dilation=(2, 1))
    >>> ref = ops.neighborhood_attention(q, k, v, kernel_size=(5, 3), dilation=(2, 1),
    ...                                  implementation="reference")
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
    ((1, 12, 10, 2, 8), True)
    """
    spatial, scale = validate(q, k, v, scale)
    blocks.check(block_sizes)
    axes = axis_windows(spatial, kernel_size, dilation, stride, is_causal)
    mask = Neighborhood(axes)
    tile = blocks.spatial_tile(block_sizes, spatial)
    impls = {
        "reference": lambda: reference.neighborhood_attention(q, k, v, mask, scale),
        "xla": lambda: xla.neighborhood_attention(q, k, v, axes, scale, tile),
        "pallas": lambda: pallas.neighborhood_attention(q, k, v, mask, scale, tile),
    }
    return dispatch.run("neighborhood_attention", impls, implementation)


def validate(q, k, v, scale):
    """Checks the arguments of neighborhood attention (errors name the argument); returns
    ``(spatial shape, scale)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "shape", None) is None:
            raise TypeError(
                f"{name} must be an array of shape [batch, *spatial, heads, head_dim]; got {type(x).__name__}"
            )
        if not 4 <= len(x.shape) <= 6:
            raise ValueError(
                f"{name} must have rank 4 to 6, [batch, *spatial (1 to 3 axes), heads, head_dim]; "
                f"got shape {x.shape}"
            )
        _checks.check_float(name, x)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != q.shape[:-2] + k.shape[-2:] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k has shape {k.shape}; expected [batch, *spatial, kv_heads, head_dim] = {q.shape[:-2]} + "
            f"[kv_heads, {q.shape[-1]}] to match q {q.shape}"
        )
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v has shape {v.shape}; its leading axes must match k's {k.shape[:-1]}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(
            f"k has {k.shape[-2]} heads (shape {k.shape}), which must divide q's {q.shape[-2]} heads"
        )
    if math.prod(q.shape) == 0:
        raise ValueError(f"q must not be empty; got shape {q.shape}")
    return tuple(q.shape[1:-2]), default_scale(q.shape[-1], scale)
