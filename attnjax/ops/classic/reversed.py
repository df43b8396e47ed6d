r"""Reversed attention (DependencyViT: "Visual Dependency Transformers: Dependency Tree Emerges
from Reversed Attention", Ding et al., CVPR 2023; dingmyu/DependencyViT).

Each child ``i`` distributes a message over parents with ``A_ij = softmax_j(q_i . k_j / sqrt D)``;
a message controller ``m_i`` (``sigmoid(w . x_i)``, computed by the caller) says how much it
sends; parent ``j`` receives

.. math::

    O_j = \sum_i m_i A_{ij} v_i, \qquad O = (m \circ A)^\top V.

Exact and blockwise in two passes: pass 1 gives ``lse_i`` (``ops.attention(q, k, .., return_lse
=True)``); pass 2 is ``ops.attention(q' = k, k' = q, v' = v)`` with the bias ``log m_i - lse_i``
on key ``i`` and the normalizer ``exp`` (:func:`attnjax.normalizers.elementwise`): its weights are
``exp(s_ij + log m_i - lse_i) = m_i A_ij``, at most ``m_i``, so nothing overflows.

Letter legend: B batch, N tokens (children and parents), H heads, D head dim, E value dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks, normalizers
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention

_EXP = normalizers.elementwise(jnp.exp)


def reversed_attention(
    q: Float[Array, "B N H D"],
    k: Float[Array, "B N H D"],
    v: Float[Array, "B N H E"],
    m: Float[Array, "B N H"],
    *,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B N H E"]:
    r"""``O = (m * softmax(q k^T))^T v``: what each token receives as a parent (module docstring).

    ``m``: each child's sent mass in ``[0, 1]`` (broadcastable to ``[B, N, H]``; ``0`` sends
    nothing). ``implementation``: ``"reference"`` (the dense weights) or ``"xla"`` (two blockwise
    passes).

    >>> import jax.numpy as jnp
    >>> q = k = jnp.zeros((1, 2, 1, 1)); v = jnp.array([1.0, 3.0]).reshape(1, 2, 1, 1)
    >>> reversed_attention(q, k, v, jnp.ones((1, 2, 1)))[0, :, 0, 0]  # each child splits evenly
    Array([2., 2.], dtype=float32)
    """
    _, _, _, H, K, D, _ = _checks.check_qkv(q, k, v, same_length=True)
    if K != H:
        raise ValueError(f"reversed attention needs as many key heads as query heads; got {K} and {H}")
    if v.shape[2] != H:
        raise ValueError(f"v must have {H} heads")
    m = jnp.broadcast_to(jnp.asarray(m, jnp.float32), q.shape[:3])
    scale = D**-0.5 if scale is None else scale

    def reference():
        s = jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k.astype(jnp.float32), precision="highest")
        a = jnp.exp(scale * s - jnp.max(scale * s, -1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        weights = m.transpose(0, 2, 1)[..., None] * a  # [B, H, i, j]
        return jnp.einsum("bhij,bihe->bjhe", weights, v.astype(jnp.float32), precision="highest").astype(
            v.dtype
        )

    def xla():
        _, lse = attention(q, k, v, scale=scale, return_lse=True, implementation="xla")  # [B, N, H]
        bias = (jnp.log(m) - lse).transpose(0, 2, 1)[:, :, None, :]  # on key i: [B, H, 1, N]
        return attention(k, q, v, bias, scale=scale, normalizer=_EXP, implementation="xla")

    return dispatch.run("reversed_attention", {"reference": reference, "xla": xla}, implementation)
