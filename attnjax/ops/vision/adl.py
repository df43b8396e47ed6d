r"""Attention diversification loss (ADL) of "Robustifying Token Attention for Vision
Transformers" (Guo, Stutz, Schiele, ICCV 2023): the mean cosine similarity between the attention
rows of different queries, to be minimized so that queries stop attending to the same few
tokens.

.. math::

    \mathrm{ADL} = \frac{1}{T (T - 1)} \sum_{i \ne j} \cos(A_i, A_j)
                 = \frac{\lVert \sum_i a_i \rVert^2 - T}{T (T - 1)},\qquad a_i = A_i / \lVert A_i \rVert

The closed form (``"xla"``) needs only the ``[S]`` vector ``sum_i a_i``, ``O(T S)``; the reference
forms the ``[T, T]`` cosine matrix. Averaged over batch and heads.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation


def attention_diversity_loss(
    weights: Float[Array, "B H T S"],
    *,
    eps: float = 1e-8,
    implementation: Implementation = None,
) -> Float[Array, ""]:
    r"""ADL of attention weights ``[B, H, T, S]`` (``T >= 2``): the mean over ordered pairs of
    different rows of their cosine similarity, averaged over ``B`` and ``H`` (float32 scalar).

    >>> import jax.numpy as jnp
    >>> from attnjax import ops
    >>> ops.attention_diversity_loss(jnp.ones((1, 1, 3, 4)) / 4)        # identical rows
    Array(1., dtype=float32)
    >>> ops.attention_diversity_loss(jnp.eye(3)[None, None])            # orthogonal rows
    Array(0., dtype=float32)
    """
    B, H, T, S = _checks.check_rank("weights", weights, ("batch", "heads", "queries", "keys"))
    _checks.check_float("weights", weights)
    if T < 2:
        raise ValueError(
            f"attention_diversity_loss needs at least 2 query rows; got weights of shape {weights.shape}"
        )
    w = weights.astype(jnp.float32)
    a = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), eps)

    def reference():
        cos = jnp.einsum("bhis,bhjs->bhij", a, a, precision="highest")
        off = cos.sum((-1, -2)) - jnp.trace(cos, axis1=-2, axis2=-1)
        return jnp.mean(off / (T * (T - 1)))

    def closed_form():
        total = a.sum(2)  # [B, H, S]
        norms = jnp.sum(a * a, (-1, -2))  # T, or fewer for all-zero rows
        return jnp.mean((jnp.sum(total * total, -1) - norms) / (T * (T - 1)))

    return dispatch.run(
        "attention_diversity_loss", {"reference": reference, "xla": closed_form}, implementation
    )
