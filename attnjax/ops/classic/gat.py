r"""Graph attention: GAT ("Graph Attention Networks", Velickovic et al., ICLR 2018) and GATv2
("How Attentive are Graph Attention Networks?", Brody et al., ICLR 2022).

.. math::

    \text{GAT:}\ e_{ij} = \mathrm{LeakyReLU}_{0.2}(a_1 \cdot W h_i + a_2 \cdot W h_j), \qquad
    \text{GATv2:}\ e_{ij} = a^\top \mathrm{LeakyReLU}_{0.2}(W_l h_i + W_r h_j),

``alpha_ij = softmax_{j in N(i)} e_ij`` and ``h'_i = sum_j alpha_ij W h_j``, per head. GAT's score
needs only the per-node scalars ``u_i = a_1 . W h_i`` and ``w_j = a_2 . W h_j``; both are
:func:`attnjax.ops.additive_attention` (GAT with hidden size 1 and ``w = 1``), evaluated per tile,
under the neighbourhood as a mask: a dense adjacency (:func:`attnjax.masks.dense`) or an analytic
mask for structured graphs (a grid's neighbourhood, a chain's sliding window), whose empty tiles
the blockwise path skips. Nodes are both queries and keys (``T = S = N``); a node with no
neighbour gets zeros. :func:`gat_edge_list` is the same computation from an edge list
(segment softmax), the reference the tests check against.

Letter legend: B batch, N nodes, H heads, P hidden (GATv2), E features per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attnjax import _checks
from attnjax.core.blocks import BlockSizes
from attnjax.core.dispatch import Implementation
from attnjax.masks import Mask
from attnjax.ops.classic.additive import additive_attention


def gat_attention(
    u: Float[Array, "B N H"],
    w: Float[Array, "B N H"],
    value: Float[Array, "B N H E"],
    adjacency: Mask | None = None,
    *,
    negative_slope: float = 0.2,
    implementation: Implementation = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B N H E"]:
    r"""GAT aggregation ``sum_j softmax_j(LeakyReLU(u_i + w_j)) value_j`` over the neighbours
    ``adjacency`` allows (``None``: the complete graph).

    Args:
      u: the receiving node's term ``a_1 . W h_i``, ``[B, N, H]``.
      w: the sending node's term ``a_2 . W h_j``, ``[B, N, H]``.
      value: ``W h_j`` per head, ``[B, N, H, E]``.
      adjacency: an :mod:`attnjax.masks` mask, query ``i`` = receiver, key ``j`` = sender (add
        self-loops to it, as GAT does).

    >>> import jax.numpy as jnp
    >>> from attnjax import ops
    >>> v = jnp.arange(6.0).reshape(1, 3, 1, 2)
    >>> z = jnp.zeros((1, 3, 1))
    >>> ops.gat_attention(z, z, v)[0, :, 0]                   # a = 0: the mean of the neighbours
    Array([[2., 3.],
           [2., 3.],
           [2., 3.]], dtype=float32)
    """
    B, N, H = _checks.check_rank("u", u, ("batch", "nodes", "heads"))
    if jnp.shape(w) != (B, N, H) or jnp.shape(value)[:3] != (B, N, H) or jnp.ndim(value) != 4:
        raise ValueError(
            f"w must be [batch, nodes, heads] = {u.shape} like u and value [batch, nodes, heads, E]; "
            f"got {jnp.shape(w)} and {jnp.shape(value)}"
        )
    return additive_attention(
        u[..., None],
        w[..., None],
        value,
        jnp.ones((H, 1), value.dtype),
        activation="leaky_relu",
        negative_slope=negative_slope,
        mask=adjacency,
        implementation=implementation,
        block_sizes=block_sizes,
    )


def gatv2_attention(
    q_feats: Float[Array, "B N H P"],
    k_feats: Float[Array, "B N H P"],
    value: Float[Array, "B N H E"],
    a: Float[Array, "H P"],
    adjacency: Mask | None = None,
    *,
    negative_slope: float = 0.2,
    implementation: Implementation = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B N H E"]:
    r"""GATv2 aggregation: ``e_ij = a_h . LeakyReLU(q_feats_i + k_feats_j)`` (``W_l h_i``,
    ``W_r h_j``), evaluated per tile; otherwise as :func:`gat_attention`."""
    return additive_attention(
        q_feats,
        k_feats,
        value,
        a,
        activation="leaky_relu",
        negative_slope=negative_slope,
        mask=adjacency,
        implementation=implementation,
        block_sizes=block_sizes,
    )


def gat_edge_list(
    value: Float[Array, "B N H E"],
    senders: Int[Array, " M"],
    receivers: Int[Array, " M"],
    edge_scores: Float[Array, "B M H"],
) -> Float[Array, "B N H E"]:
    r"""Softmax aggregation over an edge list (``M`` edges ``senders[m] -> receivers[m]``) by
    segment max / sum, given each edge's score ``edge_scores [B, M, H]``: the message-passing form
    of :func:`gat_attention` (``O(M)``, no ``[N, N]`` array), for sparse graphs and as a reference.
    A node that receives no edge gets zeros."""
    N = value.shape[1]
    e = edge_scores.astype(jnp.float32)  # [B, M, H]
    seg = lambda x, op: jax.vmap(lambda y: op(y, receivers, num_segments=N))(x)
    top = jax.lax.stop_gradient(seg(e, jax.ops.segment_max))  # [B, N, H]
    p = jnp.exp(e - top[:, receivers])
    den = seg(p, jax.ops.segment_sum)
    msg = p[..., None] * value.astype(jnp.float32)[:, senders]
    num = seg(msg, jax.ops.segment_sum)
    return (num / jnp.where(den == 0, 1.0, den)[..., None]).astype(value.dtype)
