r"""Global-query window attention ("Global Context Vision Transformers", Hatamizadeh et al., ICML
2023, arXiv 2206.09959).

One set of ``p_h x p_w`` global queries ``q_g`` (GC ViT makes them from the whole image with a
stack of convolutions and pooling, :class:`attnjax.nn.GCViTGlobalQuery`) is shared by every
window of the stage; each window's keys and values are its own:

.. math::

    O_w = \mathrm{softmax}\big(\mathrm{scale}\; q_g K_w^\top + B_{rel}\big) V_w

The efficient path is :func:`attnjax.ops.block_attention` with ``q_g`` broadcast to every window
(windows as the batch of :func:`attnjax.ops.attention`, ``O(h w p^2 D)``; the broadcast queries
are the size of the output); the reference is the same broadcast through block attention's dense
masked reference.

Letter legend: B batch, (h, w) grid, (p_h, p_w) window, H heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.core.dispatch import Implementation
from attnjax.masks.grid import pair
from attnjax.ops.vision.maxvit import block_attention
from attnjax.score_mods import ScoreMod


def window_cross_attention(
    q: Float[Array, "B ph pw H D"],
    k: Float[Array, "B h w K D"],
    v: Float[Array, "B h w K E"],
    *,
    window: int | tuple[int, int],
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B h w H E"]:
    r"""Every ``window`` window of ``k``/``v`` attends from the same queries ``q [B, p_h, p_w, H, D]``
    (GC ViT's global queries); returns ``[B, h, w, H, E]`` (each window's output at its tokens).

    ``score_mod`` sees window-local indices as in :func:`attnjax.ops.block_attention` (a Swin
    relative bias: :func:`attnjax.score_mods.relative_bias_2d` with ``grid=window``).
    ``implementation`` is block attention's.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> k = v = jax.random.normal(jax.random.key(0), (1, 8, 12, 2, 4))
    >>> q = jax.random.normal(jax.random.key(1), (1, 4, 4, 2, 4))
    >>> ops.window_cross_attention(q, k, v, window=4).shape
    (1, 8, 12, 2, 4)
    """
    B, ph, pw, H, D = _checks.check_rank("q", q, ("batch", "window_h", "window_w", "heads", "head_dim"))
    shape = _checks.check_rank("k", k, ("batch", "height", "width", "kv_heads", "head_dim"))
    a, b = pair("window", window)
    if (ph, pw) != (a, b):
        raise ValueError(f"q has shape {q.shape}; its window axes must be window={(a, b)}")
    if shape[0] != B:
        raise ValueError(f"k has batch {shape[0]}; q has {B}")
    h, w = shape[1:3]
    if h % a or w % b:
        raise ValueError(f"window={(a, b)} must divide the grid {(h, w)}")
    tiled = jnp.tile(q, (1, h // a, w // b, 1, 1))
    return block_attention(
        tiled, k, v, window=(a, b), score_mod=score_mod, scale=scale, implementation=implementation
    )
