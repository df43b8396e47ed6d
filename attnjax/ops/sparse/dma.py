r"""Dynamic Mask Attention ("Trainable Dynamic Mask Sparse Attention", Shi et al., 2025,
arXiv 2508.02124; SmallDoges/flash-dmattn).

Per head a key score from the key's values, ``delta_{h,j} = exp(A_h softplus(v_j W_dt + b))``
(:func:`dma_delta`; ``A_h`` is zero-initialized in the example code, so ``delta = 1`` at first).
Query ``i`` (position ``p_i``, bottom-right aligned) keeps the top-``w`` keys ``j <= p_i`` by
``delta_{h,j}`` (everything when ``p_i < w``) and attends with ``delta`` as a key bias:

.. math::

    O_i = \mathrm{softmax}_{j \in \mathrm{top}_w\{j \le p_i\}}
          \big(q_i \cdot k_j / \sqrt D + \delta_{h,j}\big)\, V.

``delta`` is both the selector (held fixed: the threshold is computed under ``stop_gradient``)
and a bias (it gets gradients). The threshold of query ``i`` is ``t_i`` = the ``w``-th largest
``delta_{h,j}`` over ``j <= p_i``; keys with ``delta_{h,j} >= t_i`` are kept (ties kept). The
reference sorts every prefix (``O(T S log S)``); the xla path computes the running top-``w`` in
blocks (:func:`attnjax.masks.topk_keys`, ``O(S (w + b) log)``) and runs ``ops.attention``'s
blockwise path under ``causal & topk_keys``, whose block map skips a tile when the largest
``delta`` of its keys is below the smallest threshold of its queries (flash-dmattn's skip), so
work is ``O(T w D)`` when selective.

Letter legend: B batch, T queries, S keys, H heads, K key/value heads, D head dim, E value dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attnjax import _checks, masks
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.masks.topk import prefix_thresholds, topk_keys
from attnjax.ops.attention.api import attention


def dma_delta(
    v: Float[Array, "B S K E"], w_dt: Float[Array, "KE H"], b_dt: Float[Array, " H"], a: Float[Array, " H"]
) -> Float[Array, "B H S"]:
    """``delta_{h,j} = exp(A_h softplus(v_j W_dt + b))`` from the values of every key head
    (concatenated, ``K E`` features), float32 ``[B, H, S]``."""
    B, S, K, E = _checks.check_rank("v", v, ("batch", "kv_len", "kv_heads", "v_head_dim"))
    x = v.reshape(B, S, K * E).astype(jnp.float32) @ w_dt.astype(jnp.float32) + b_dt
    return jnp.exp(a * jax.nn.softplus(x)).transpose(0, 2, 1)


def dma_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    delta: Float[Array, "B H S"],
    keep_window: int,
    *,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    """Dynamic mask attention (module docstring): causal, top-``keep_window`` keys by ``delta``.

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, K, D]``, ``[B, S, K, E]`` (``T <= S``, bottom-right).
      delta: per-head key scores ``[B, H, S]`` (:func:`dma_delta`), selector and key bias.
      keep_window: ``w``, keys kept per query.
      scale: logit scale, default ``1 / sqrt(D)``.
      implementation: ``"reference"`` (prefix sorts, dense) or ``"xla"`` (running top-w,
        blockwise attention with tile skipping).

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 32, 2, 8))
    >>> delta = jax.random.uniform(jax.random.key(1), (1, 2, 32))
    >>> out = ops.dma_attention(q, k, v, delta, 8)
    >>> ref = ops.dma_attention(q, k, v, delta, 8, implementation="reference")
    >>> bool(jnp.allclose(out, ref, atol=1e-5))
    True
    """
    B, T, S, H, _, _, _ = _checks.check_qkv(q, k, v)
    if T > S:
        raise ValueError(
            f"dma_attention needs q_len <= kv_len (queries are the last tokens); got T={T}, S={S}"
        )
    shape = _checks.check_rank("delta", delta, ("batch", "heads", "kv_len"))
    if shape != (B, H, S):
        raise ValueError(f"delta has shape {shape}; expected [batch={B}, heads={H}, kv_len={S}]")
    w = _checks.positive_int("keep_window", keep_window)
    bias = delta.astype(jnp.float32)[:, :, None, :]

    def run(impl, thresholds):
        sel = lax.stop_gradient(delta.astype(jnp.float32))
        mask = masks.causal() & topk_keys(sel, thresholds[:, :, S - T :])
        return attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl)

    impls = {
        "reference": lambda: run("reference", _dense_thresholds(lax.stop_gradient(delta), w)),
        "xla": lambda: run("xla", prefix_thresholds(lax.stop_gradient(delta), w)),
    }
    return dispatch.run("dma_attention", impls, implementation)


def _dense_thresholds(score, w):
    """``t [B, H, S]``: the ``w``-th largest of ``score[..., :p+1]`` per position (``-inf`` if
    fewer), by sorting every prefix."""
    S = score.shape[-1]
    prefix = jnp.where(
        jnp.arange(S)[None, :] <= jnp.arange(S)[:, None], score[..., None, :].astype(jnp.float32), -jnp.inf
    )  # [B, H, S, S]
    if w > S:
        return jnp.full(score.shape, -jnp.inf)
    return jnp.sort(prefix, axis=-1)[..., S - w]
