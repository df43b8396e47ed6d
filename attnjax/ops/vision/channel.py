r"""Channel-as-token attention: channels are the tokens, spatial positions the features.

For ``q, k, v [B, N, C]`` split into ``G`` groups of ``C_g = C / G`` channels, group ``g``'s
channel ``i`` attends to the group's channels ``j`` with logits ``scale * <q_{:, i}, k_{:, j}>``
(a dot product over the ``N`` positions):

.. math::

    \mathrm{out}_{n, i} = \sum_{j} \mathrm{softmax}_j\Big(\mathrm{scale} \sum_{n'} q_{n' i} k_{n' j}\Big)\, v_{n j}

``O(N C_g C)``: linear in the number of positions. It transposes (tokens = channels, heads =
groups, head dim = ``N``) and calls :func:`attnjax.ops.attention`, so it inherits its
implementations. DaViT's channel group attention is ``channel_attention(k, v, q, groups=G,
scale=C_g ** -0.5)`` (the affinity from ``K^T V``, applied to ``Q``); DANet's channel attention
module is ``channel_attention(x, x, x, scale=-1.0)`` (``softmax(rowmax(XX^T) - XX^T) =
softmax(-XX^T)``).
"""

from __future__ import annotations

from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention


def channel_attention(
    q: Float[Array, "B N C"],
    k: Float[Array, "B N C"],
    v: Float[Array, "B N C"],
    *,
    groups: int = 1,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B N C"]:
    r"""Softmax attention among the channels of each of ``groups`` channel groups (the module
    docstring has the equation). ``scale`` defaults to ``N ** -0.5`` (the positions are the head
    dim); ``implementation`` is :func:`attnjax.ops.attention`'s. ``q``, ``k`` and ``v`` are
    ``[B, N, C]`` (flatten a map's positions first); ``groups`` divides ``C``.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> x = jax.random.normal(jax.random.key(0), (1, 10, 6))
    >>> out = ops.channel_attention(x, x, x, groups=2, scale=0.1)
    >>> a = jax.nn.softmax(0.1 * jnp.einsum("nci,ncj->nij", x[..., :3], x[..., :3]), -1)
    >>> bool(jnp.allclose(out[..., :3], jnp.einsum("nij,ncj->nci", a, x[..., :3]), atol=1e-5))
    True
    """
    B, N, C = _checks.check_rank("q", q, ("batch", "positions", "channels"))
    for name, x in (("k", k), ("v", v)):
        if _checks.check_rank(name, x, ("batch", "positions", "channels")) != (B, N, C):
            raise ValueError(f"{name} has shape {x.shape}; channel_attention needs q's shape {(B, N, C)}")
    G = _checks.positive_int("groups", groups)
    if C % G:
        raise ValueError(f"groups={G} must divide the {C} channels")
    tokens = lambda x: x.reshape(B, N, G, C // G).transpose(0, 3, 2, 1)  # [B, C_g, G, N]
    out = attention(tokens(q), tokens(k), tokens(v), scale=scale, implementation=implementation)
    return out.transpose(0, 3, 2, 1).reshape(B, N, C)
