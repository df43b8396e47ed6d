r"""Mixture of sparse attention ("MoA: Mixture of Sparse Attention for Automatic Large Language
Model Compression", Fu et al., 2024).

Each head ``h`` is causal attention over a sliding window whose span grows with the input
length, plus the first ``n_sink`` keys:

.. math::

    O_h = \mathrm{softmax}\big(\tfrac{1}{\sqrt D} Q_h K_h^\top + M_h\big) V_h, \qquad
    M_h(i, j) = 0 \text{ if } j \le p_i \wedge (j > p_i - L_h \vee j < n_\mathrm{sink}) \text{ else } -\infty,

with ``L_h = floor(alpha_h + beta_h * S)`` and ``p_i = i + S - T`` (bottom-right alignment). The
mask is :func:`attnjax.masks.moa`; this op runs every distinct span as its own blockwise call, so
each head skips the tiles *its* window leaves empty: cost ``O(T * (L_h + n_sink) * D)`` per head
instead of the ``O(T * max_h L_h * D)`` of one call whose block map is reduced over heads.

Letter legend: B batch, T query length, S key length, H heads, K key/value heads, D head dim,
E value head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attnjax import _checks, masks
from attnjax.core.dispatch import Implementation
from attnjax.core.tiling import Shard
from attnjax.ops.attention.api import attention


def moa_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    *,
    alpha,
    beta,
    sinks: int = 0,
    implementation: Implementation = None,
    shard: Shard | None = None,
    **attention_kwargs,
) -> Float[Array, "B T H E"]:
    """MoA attention: per-head spans ``alpha_h + beta_h * S`` plus ``sinks`` initial keys.

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, K, D]``, ``[B, S, K, E]`` (``K`` divides ``H``).
      alpha, beta: per-head sequences of length ``H`` (static numbers, >= 0).
      sinks: how many initial keys every query also sees.
      implementation: ``"reference"`` (one dense call with the head-dependent mask) or
        ``"xla"``/``"pallas"``/None (one blockwise call per distinct span, skipping per head).
      shard: where ``q``/``k``/``v`` sit in a larger problem (:class:`attnjax.ops.Shard`, as for
        :func:`attnjax.ops.attention`; ``alpha``/``beta`` are then per *global* head).
      **attention_kwargs: more arguments of :func:`attnjax.ops.attention` (``scale``,
        ``block_sizes``, ``normalizer``, ``dropout_rate``, ...; not ``mask``).

    Heads that share a span run together; with grouped-query attention their key/value heads are
    gathered per query head for that call (a copy of ``S * D`` per head). Each group's call is
    told which global heads it holds (``Shard.head_ids``), so per-head masks, score mods and
    dropout see the same head indices as the one dense call of the reference.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 64, 4, 8))
    >>> kw = dict(alpha=(4, 4, 8, 0), beta=(0.0, 0.0, 0.1, 0.5), sinks=2)
    >>> out = ops.moa_attention(q, k, v, **kw)
    >>> ref = ops.moa_attention(q, k, v, implementation="reference", **kw)
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
    ((1, 64, 4, 8), True)
    """
    B, T, S, H, K, D, E = _checks.check_qkv(q, k, v)
    if "mask" in attention_kwargs:
        raise TypeError("moa_attention builds its own mask; combine masks.moa(...) with ops.attention instead")
    mask = masks.moa(alpha, beta, sinks)
    kv_len = S if shard is None else shard.kv_len
    mask.check(B, H if shard is None else shard.heads, T, kv_len)
    if implementation == "reference":
        return attention(q, k, v, mask=mask, implementation="reference", shard=shard, **attention_kwargs)
    outer = shard if shard is not None else Shard.make(batch=B, heads=H, q_len=T, kv_len=S)
    global_heads = _global_heads(outer, H)
    spans = mask.spans(kv_len)
    groups: dict[int, list[int]] = {}
    for h in range(H):  # local heads by the span of their global head (one group if traced)
        groups.setdefault(0 if global_heads is None else spans[global_heads[h]], []).append(h)
    G = H // K
    outs, order = [], []
    for heads in groups.values():
        if len(heads) == H:
            qg, kg, vg, sub = q, k, v, shard
        else:
            idx, kv_idx = jnp.asarray(heads), jnp.asarray([h // G for h in heads])
            qg, kg, vg = q[:, :, idx], k[:, :, kv_idx], v[:, :, kv_idx]
            ids = jnp.asarray([global_heads[h] for h in heads], jnp.int32)
            sub = dataclasses.replace(outer, head_offset=jnp.zeros((), jnp.int32), head_ids=ids)
        outs.append(attention(qg, kg, vg, mask=mask, implementation=implementation, shard=sub, **attention_kwargs))
        order.extend(heads)
    out = jnp.concatenate(outs, axis=2)
    inverse = [order.index(h) for h in range(H)]
    return out if inverse == list(range(H)) else out[:, :, jnp.asarray(inverse)]


def _global_heads(shard: Shard, heads: int) -> list[int] | None:
    """The global head of each local head as Python ints, or None if the shard's are traced."""
    if shard.head_ids is None and shard.heads == heads:  # all the heads: the offset can only be 0
        return list(range(heads))
    try:
        offset = int(np.asarray(shard.head_offset))
        ids = range(heads) if shard.head_ids is None else np.asarray(shard.head_ids).tolist()
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    return [offset + int(i) for i in ids]
