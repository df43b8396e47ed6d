r"""Dual cross-attention ("Dual Cross-Attention Learning for Fine-Grained Visual Categorization
and Object Re-Identification", Zhu et al., CVPR 2022): GLCA and PWCA.

* GLCA (global-local cross-attention): from the attention rollout's CLS row
  (:func:`attnjax.analysis.rollout`), keep the top ``R`` patches plus CLS as local queries and let
  them attend over *all* tokens: ``f = softmax(Q^l K^{g\top} / \sqrt d) V^g``, i.e. gathered
  queries and ``ops.attention``.
* PWCA (pair-wise cross-attention, training only): image 1's queries attend over the keys and
  values of both images, ``softmax(Q_1 [K_1; K_2]^\top / \sqrt d) [V_1; V_2]``: ``ops.attention``
  over the concatenation (no mask), weights shared with self-attention.

Letter legend: B batch, S tokens (CLS first), H heads, D head dim, E value dim, R kept patches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attnjax import _checks
from attnjax.ops.attention.api import attention


def pwca_attention(
    q1: Float[Array, "B T H D"],
    k1: Float[Array, "B S K D"],
    v1: Float[Array, "B S K E"],
    k2: Float[Array, "B S2 K D"],
    v2: Float[Array, "B S2 K E"],
    **kwargs,
) -> Float[Array, "B T H E"]:
    """PWCA: ``ops.attention(q1, [k1; k2], [v1; v2])`` (``kwargs`` go to :func:`attnjax.ops.attention`).

    >>> import jax
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 4, 1, 8))
    >>> import jax.numpy as jnp
    >>> from attnjax import ops
    >>> bool(jnp.allclose(pwca_attention(q, k, v, k, v), ops.attention(q, k, v), atol=1e-6))
    True
    """
    _checks.check_qkv(q1, k1, v1)
    _checks.check_qkv(q1, k2, v2, names=("q1", "k2", "v2"))
    return attention(q1, jnp.concatenate([k1, k2], 1), jnp.concatenate([v1, v2], 1), **kwargs)


def glca_queries(cls_row: Float[Array, "B S"], keep: int) -> Int[Array, "B R1"]:
    """Indices ``[B, 1 + keep]``: CLS (0) then the ``keep`` patches with the largest rollout
    weight in ``cls_row`` (positions ``1..S-1``), in descending order; no gradient."""
    B, S = _checks.check_rank("cls_row", cls_row, ("batch", "tokens"))
    keep = _checks.positive_int("keep", keep)
    if keep > S - 1:
        raise ValueError(f"keep={keep} must be at most the {S - 1} patches")
    _, top = jax.lax.top_k(jax.lax.stop_gradient(cls_row[:, 1:]), keep)
    return jnp.concatenate([jnp.zeros((B, 1), top.dtype), top + 1], 1)


def glca_attention(
    q: Float[Array, "B S H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    cls_row: Float[Array, "B S"],
    keep: int,
    **kwargs,
) -> tuple[Float[Array, "B R1 H E"], Int[Array, "B R1"]]:
    """GLCA: ``(out [B, 1 + keep, H, E], indices)``: the local queries (:func:`glca_queries`)
    attend over all tokens (``kwargs`` go to :func:`attnjax.ops.attention`)."""
    _checks.check_qkv(q, k, v, same_length=True)
    idx = glca_queries(cls_row, keep)
    q_local = jnp.take_along_axis(q, idx[:, :, None, None], 1)
    return attention(q_local, k, v, **kwargs), idx
