"""Pieces shared by the routed/sparse variants (BiFormer, routing, HyperAttention, landmark).

* :func:`merge` combines partial softmax attentions over disjoint key sets by their
  log-sum-exps (how a query's output over several gathered key groups is assembled);
* :func:`dense_reference` is the one dense reference they all reduce to: softmax attention whose
  weights are ``c_ij exp(s_ij)`` for a non-negative coefficient matrix ``c`` (0 = masked,
  1 = attended, ``n/m`` = a sampled key standing for ``n/m`` keys, a multiplicity ``m`` = a key
  reached through ``m`` clusters), i.e. ``ops.attention(implementation="reference")`` with the
  mask ``c > 0`` and the bias ``log c``.

Letter legend as in :mod:`attnjax.ops._common`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

GROUP_IMPLEMENTATION = "reference"
"""How gathered groups (a region's routed keys, a cluster, a sorted-LSH block, sampled columns)
are attended: each is a small dense problem with nothing to skip inside, so ops.attention's dense
path serves it; the sparsity is in which keys were gathered."""


def merge(parts) -> tuple[Float[Array, "... E"], Float[Array, "..."]]:
    """Merges partial attentions ``[(out [..., E], lse [...]), ...]`` (float32) over disjoint
    key sets into ``(out, lse)`` of the union; a row with ``lse = -inf`` everywhere gives zeros."""
    lses = jnp.stack([lse for _, lse in parts])
    # The shift is only for range; it cancels, so no gradient needs to flow through it.
    top = jax.lax.stop_gradient(lses.max(0))
    top = jnp.where(jnp.isneginf(top), 0.0, top)
    ws = jnp.exp(lses - top)  # [n, ...]; exactly 0 for lse = -inf
    total = ws.sum(0)
    safe = jnp.where(total == 0, 1.0, total)
    out = sum(w[..., None] * o for w, (o, _) in zip(ws, parts)) / safe[..., None]
    lse = jnp.where(total == 0, -jnp.inf, top + jnp.log(safe))
    return out, lse


def dense_reference(q, k, v, coeff: Float[Array, "#B #H T S"], scale: float | None = None):
    """Softmax attention with weights ``coeff_ij exp(s_ij) / sum_j coeff_ij exp(s_ij)``, dense.

    ``coeff`` is non-negative (no gradient flows into it). Returns ``(out, lse)``.
    """
    from attnjax.nn.flax_adapter import dense_mask  # the dense-array mask lives with the Flax adapter
    from attnjax.ops.attention import attention

    coeff = jax.lax.stop_gradient(coeff.astype(jnp.float32))
    allowed = coeff > 0
    bias = jnp.where(allowed, jnp.log(jnp.where(allowed, coeff, 1.0)), 0.0)
    return attention(q, k, v, mask=dense_mask(allowed), bias=bias, scale=scale, return_lse=True,
                     implementation="reference")
