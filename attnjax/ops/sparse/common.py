"""Pieces shared by the routed/sparse variants (BiFormer, routing, HyperAttention, landmark).

* (partial attentions over gathered key groups are combined by :func:`attnjax.core.tiling.merge`);
* :func:`dense_reference` is the one dense reference they all reduce to: softmax attention whose
  weights are ``c_ij exp(s_ij)`` for a non-negative coefficient matrix ``c`` (0 = masked,
  1 = attended, ``n/m`` = a sampled key standing for ``n/m`` keys, a multiplicity ``m`` = a key
  reached through ``m`` clusters), i.e. ``ops.attention(implementation="reference")`` with the
  mask ``c > 0`` and the bias ``log c``.

Letter legend as in :mod:`attnjax.core.tiling`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import masks
from attnjax.ops.attention.api import attention

GROUP_IMPLEMENTATION = "reference"
"""How gathered groups (a region's routed keys, a cluster, a sorted-LSH block, sampled columns)
are attended: each is a small dense problem with nothing to skip inside, so ops.attention's dense
path serves it; the sparsity is in which keys were gathered."""


def dense_reference(q, k, v, coeff: Float[Array, "#B #H T S"], scale: float | None = None):
    """Softmax attention with weights ``coeff_ij exp(s_ij) / sum_j coeff_ij exp(s_ij)``, dense.

    ``coeff`` is non-negative (no gradient flows into it). Returns ``(out, lse)``.
    """
    coeff = jax.lax.stop_gradient(coeff.astype(jnp.float32))
    allowed = coeff > 0
    bias = jnp.where(allowed, jnp.log(jnp.where(allowed, coeff, 1.0)), 0.0)
    return attention(q, k, v, mask=masks.dense(allowed), bias=bias, scale=scale, return_lse=True,
                     implementation="reference")
