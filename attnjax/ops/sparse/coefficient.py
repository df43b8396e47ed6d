r"""Coefficient-weighted softmax attention with gradients to the coefficients (zoo primitive C6).

.. math::

    O_i = \frac{\sum_j c_{ij} e^{s_{ij}} v_j}{\sum_j c_{ij} e^{s_{ij}}}, \qquad c_{ij} \ge 0,

the form every routed/sparse variant reduces to (:func:`attnjax.ops.sparse.common.dense_reference`,
which holds ``c`` fixed). Learned masks (NAtS, straight-through Gumbel masks) need
``dO / dc``: with ``coeff_grad=True`` the coefficients get

.. math::

    \frac{\partial L}{\partial c_{ij}} = e^{s_{ij} - \mathrm{lse}_i}
        \big(\bar O_i \cdot v_j - \bar O_i \cdot O_i + \overline{\mathrm{lse}}_i\big),

which is finite also where ``c_ij = 0`` (a masked entry learns whether to open): a hard 0/1 mask
``m = hard + soft - stop_gradient(soft)`` passed as ``coeff`` is then a straight-through mask.

The reference differentiates the dense weights (``ops.attention`` over identity values, i.e.
the plain softmax ``P``, then ``c P / sum c P``); the xla path runs ``ops.attention`` with the
mask ``c > 0`` and the bias ``log c`` (blockwise, skipping tiles where ``c`` is zero) and computes
the coefficient gradient above in a custom VJP (``O(T S)`` like ``c`` itself).

Letter legend: B batch, T queries, S keys, H heads, K key/value heads, D head dim, E value dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks, masks
from attnjax.core import dispatch, tiling
from attnjax.core.dispatch import Implementation
from attnjax.core.utils import default_scale
from attnjax.ops.attention.api import attention


def coefficient_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    coeff: Float[Array, "#B #H T S"],
    *,
    coeff_grad: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: Implementation = None,
):
    """Softmax attention with weights ``c_ij e^{s_ij} / sum_j c_ij e^{s_ij}`` (module docstring).

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, K, D]``, ``[B, S, K, E]``.
      coeff: non-negative coefficients broadcastable to ``[B, H, T, S]`` (rank 4); 0 = masked.
      coeff_grad: whether ``coeff`` gets gradients (else they are stopped, as in the routed ops).
      scale: logit scale, default ``1 / sqrt(D)``.
      return_lse: also return ``lse_i = log sum_j c_ij e^{s_ij}`` ``[B, T, H]`` (float32).
      implementation: ``"reference"`` (dense) or ``"xla"`` (blockwise attention, custom VJP).

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 6, 1, 4))
    >>> c = jnp.ones((1, 1, 6, 6)).at[..., 0].set(0.0)
    >>> g = jax.grad(lambda c: ops.coefficient_attention(q, k, v, c).sum())(c)
    >>> bool(jnp.abs(g[..., 0]).max() > 0)  # the masked column still learns
    True
    """
    B, T, S, H, K, D, _ = _checks.check_qkv(q, k, v)
    _checks.broadcastable_to("coeff", coeff, (B, H, T, S), ("batch", "heads", "q_len", "kv_len"))
    _checks.check_float("coeff", coeff)
    scale = default_scale(D, scale)
    coeff = coeff.astype(jnp.float32)
    if not coeff_grad:
        coeff = jax.lax.stop_gradient(coeff)
    impls = {
        "reference": lambda: _reference(q, k, v, coeff, scale),
        "xla": lambda: _blockwise(q, k, v, coeff, scale),
    }
    out, lse = dispatch.run("coefficient_attention", impls, implementation)
    return (out, lse) if return_lse else out


def _reference(q, k, v, coeff, scale):
    B, T, H, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    f32 = lambda x: x.astype(jnp.float32)
    eye = jnp.broadcast_to(jnp.eye(S, dtype=jnp.float32)[None, :, None, :], (B, S, K, S))
    p, lse0 = attention(f32(q), f32(k), eye, scale=scale, return_lse=True, implementation="reference")
    w = coeff * p.transpose(0, 2, 1, 3)  # [B, H, T, S]
    total = w.sum(-1)
    safe = jnp.where(total > 0, total, 1.0)
    out = tiling.weighted_values(w / safe[..., None], f32(v)).transpose(0, 2, 1, 3)
    lse = jnp.where(total > 0, lse0.transpose(0, 2, 1) + jnp.log(safe), -jnp.inf).transpose(0, 2, 1)
    return out.astype(q.dtype), lse


def _blockwise(q, k, v, coeff, scale):
    @jax.custom_vjp
    def run(q, k, v, coeff):
        return _forward(q, k, v, coeff)

    def _forward(q, k, v, coeff):
        allowed = coeff > 0
        bias = jnp.log(jnp.where(allowed, coeff, 1.0))
        return attention(
            q, k, v, bias=bias, mask=masks.dense(allowed), scale=scale, return_lse=True, implementation="xla"
        )

    def fwd(q, k, v, coeff):
        out, lse = _forward(q, k, v, coeff)
        return (out, lse), (q, k, v, coeff, out, lse)

    def bwd(res, cts):
        q, k, v, coeff, out, lse = res
        d_out, d_lse = cts
        _, vjp = jax.vjp(lambda q, k, v: _forward(q, k, v, coeff), q, k, v)
        dq, dk, dv = vjp(cts)
        # dL/dc_ij = e^{s_ij - lse_i} (dO_i . v_j - dO_i . O_i + dlse_i); 0 for rows with no key.
        s = tiling.scores(q, k, scale)  # [B, H, T, S] float32
        dov = tiling.scores(d_out, v, 1.0)  # dO_i . v_j
        row = (jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1) - d_lse).transpose(0, 2, 1)
        lse_t = lse.transpose(0, 2, 1)
        p = jnp.where(jnp.isneginf(lse_t)[..., None], 0.0, jnp.exp(s - lse_t[..., None]))
        dc = p * (dov - row[..., None])
        dc = dc.sum(tuple(i for i in range(4) if coeff.shape[i] == 1), keepdims=True)
        return dq, dk, dv, dc.astype(coeff.dtype)

    run.defvjp(fwd, bwd)
    return run(q, k, v, coeff)
