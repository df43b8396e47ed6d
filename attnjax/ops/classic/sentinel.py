r"""Adaptive attention with a visual sentinel ("Knowing When to Look: Adaptive Attention via A
Visual Sentinel for Image Captioning", Lu et al., CVPR 2017).

.. math::

    z_{ti} = w^\top \tanh(W_v v_i + W_g h_t), \qquad
    \hat z_t = w^\top \tanh(W_s s_t + W_g h_t), \qquad
    \hat\alpha_t = \mathrm{softmax}([z_t; \hat z_t]), \qquad \beta_t = \hat\alpha_t[k + 1],

    \hat c_t = \beta_t s_t + (1 - \beta_t)\, c_t, \qquad c_t = \sum_i \mathrm{softmax}(z_t)_i v_i.

One softmax over the ``k`` regions and the sentinel as an appended per-query key/value is the same
thing; it is computed exactly and blockwise by merging: ``(c_t, lse_t)`` from
:func:`attnjax.ops.additive_attention` with ``return_lse``, then ``beta_t = sigmoid(\hat z_t -
lse_t)``. :func:`sentinel_attention` returns ``(\hat c_t, \beta_t)``.

Letter legend: B batch, T decoding steps (queries), S regions, H heads, P hidden, E value dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax.core.blocks import BlockSizes
from attnjax.core.dispatch import Implementation
from attnjax.masks import Mask
from attnjax.ops.classic.additive import activation_fn, additive_attention


def sentinel_attention(
    q_feats: Float[Array, "B T H P"],
    k_feats: Float[Array, "B S K P"],
    value: Float[Array, "B S K E"],
    s_feats: Float[Array, "B T H P"],
    sentinel: Float[Array, "B T H E"],
    w: Float[Array, "H P"],
    *,
    mask: Mask | None = None,
    implementation: Implementation = None,
    block_sizes: BlockSizes | None = None,
) -> tuple[Float[Array, "B T H E"], Float[Array, "B T H"]]:
    r"""``(c^_t, beta_t)``: additive attention over the regions and the sentinel (module docstring).

    Args:
      q_feats: ``W_g h_t`` ``[B, T, H, P]``; k_feats: ``W_v v_i`` ``[B, S, K, P]``; value: the
        regions ``v_i`` ``[B, S, K, E]``; s_feats: ``W_s s_t`` ``[B, T, H, P]``; sentinel: ``s_t``
        ``[B, T, H, E]``; w: ``[H, P]``.
      mask, implementation, block_sizes: as :func:`attnjax.ops.additive_attention`.

    >>> import jax.numpy as jnp
    >>> z = jnp.zeros((1, 1, 1, 2))
    >>> c, beta = sentinel_attention(z, jnp.zeros((1, 3, 1, 2)), jnp.ones((1, 3, 1, 1)), z,
    ...                              jnp.zeros((1, 1, 1, 1)), jnp.ones((1, 2)))
    >>> float(beta[0, 0, 0]), float(c[0, 0, 0, 0])                     # 4 equal logits
    (0.25, 0.75)
    """
    if s_feats.shape != q_feats.shape or sentinel.shape != q_feats.shape[:3] + value.shape[-1:]:
        raise ValueError(
            f"s_feats must be shaped like q_feats {q_feats.shape} and sentinel "
            f"[batch, q_len, heads, E={value.shape[-1]}]; got {s_feats.shape} and {sentinel.shape}"
        )
    c, lse = additive_attention(
        q_feats,
        k_feats,
        value,
        w,
        mask=mask,
        implementation=implementation,
        block_sizes=block_sizes,
        return_lse=True,
    )
    tanh = activation_fn("tanh")
    z_hat = jnp.einsum(
        "bthp,hp->bth", tanh(q_feats.astype(jnp.float32) + s_feats.astype(jnp.float32)), w.astype(jnp.float32)
    )
    # a row with no visible region has lse = -inf: all the mass goes to the sentinel
    beta = jnp.where(jnp.isneginf(lse), 1.0, jax.nn.sigmoid(z_hat - jnp.where(jnp.isneginf(lse), 0.0, lse)))
    out = beta[..., None] * sentinel.astype(jnp.float32) + (1 - beta[..., None]) * c.astype(jnp.float32)
    return out.astype(value.dtype), beta
