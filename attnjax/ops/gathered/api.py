r"""Attention of each query block over a given list of key blocks (zoo primitive C2).

Queries are cut into blocks of ``block_q``, keys into blocks of ``block_k``. Query block ``i``
(per batch element and selection head) lists key blocks ``indices[b, h, i, :]``; its queries
attend, with one softmax, to the keys of those blocks that the analytic ``extra_mask`` allows:

.. math::

    O_t = \sum_{s \in \mathcal S(t)} \mathrm{softmax}_{s \in \mathcal S(t)}
          \big(\tfrac{q_t \cdot k_s}{\sqrt D} + \beta_{s}\big)\, v_s, \qquad
    \mathcal S(t) = \{ s : \lfloor s / b_k \rfloor \in I_{\lfloor t / b_q \rfloor},\
                       \mathrm{extra\_mask}(t, s) \},

with ``beta`` an optional per-key bias (it gets gradients). The list is a *set*: slots holding
``-1`` (or any index outside ``[0, ceil(S / block_k))``) are padding, and a repeated index
counts once. Indices are integers, so the selection is held fixed for gradients (the selectors
built on this op compute them under ``stop_gradient``). A row with no allowed key gives zeros
and log-sum-exp ``-inf``. ``extra_mask`` is any :mod:`attnjax.masks` mask in the original
coordinates (positional masks aligned bottom-right, as everywhere in attnjax).

This is the common back end of the "select key blocks, then attend exactly" mechanisms (HiP,
Loki, DHSA, DMA, LongHeads, ...). The xla path gathers ``n * block_k`` keys per query block and
costs ``O(T n b_k D)`` time and ``O(T D + c n b_k D)`` memory (``c`` query blocks at a time)
instead of ``O(T S D)``.

Letter legend: B batch, T queries, S keys, H query heads, K key/value heads, D head dim, E value
dim; ``nq = ceil(T / block_q)`` query blocks, ``nk = ceil(S / block_k)`` key blocks, ``n`` slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attnjax import _checks
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.core.utils import default_scale
from attnjax.masks import Mask
from attnjax.ops.gathered import reference, xla


def gathered_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    indices: Int[Array, "B Hs nq n"],
    block_q: int,
    block_k: int,
    extra_mask: Mask | None = None,
    *,
    key_bias: Float[Array, "B Hb S"] | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    query_chunk: int | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"] | tuple[Float[Array, "B T H E"], Float[Array, "B T H"]]:
    """Each query block attends to the keys of its listed key blocks (module docstring).

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, K, D]``, ``[B, S, K, E]`` (``K`` divides ``H``).
      indices: integer key-block lists ``[B, Hs, ceil(T / block_q), n]`` with ``Hs`` = ``H``
        (per query head) or ``K`` (shared by the query heads of a key/value head). ``-1`` (any
        index outside ``[0, ceil(S / block_k))``) is an empty slot; repeats count once.
      block_q, block_k: query and key block sizes (the last blocks may be ragged).
      extra_mask: an analytic mask applied inside the listed blocks (e.g. ``masks.causal()``).
      key_bias: additive per-key logit bias ``[B, 1|K|H, S]`` (query head ``h`` reads row
        ``h // (H // rows)``); differentiable.
      scale: logit scale, default ``1 / sqrt(D)``.
      return_lse: also return the float32 log-sum-exp ``[B, T, H]`` (for merging with other
        partial attentions, :func:`attnjax.ops.merge_partials`).
      query_chunk: query blocks processed together by the xla path (default: enough for about
        4096 queries); memory is ``O(query_chunk * block_q * n * block_k)`` per head.
      implementation: ``"reference"`` (dense) or ``"xla"`` (gathered); None tries xla first.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops, masks
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 20, 2, 8))
    >>> idx = jnp.array([[[0, -1], [0, 1], [2, 0]]] * 2)[None]  # [B=1, H=2, nq=3, n=2]
    >>> out = ops.gathered_attention(q, k, v, idx, 8, 8, masks.causal())
    >>> ref = ops.gathered_attention(q, k, v, idx, 8, 8, masks.causal(), implementation="reference")
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
    ((1, 20, 2, 8), True)
    """
    B, T, S, H, K, D, _ = _checks.check_qkv(q, k, v)
    block_q = _checks.positive_int("block_q", block_q)
    block_k = _checks.positive_int("block_k", block_k)
    nq = -(-T // block_q)
    shape = _checks.check_rank("indices", indices, ("batch", "sel_heads", "q_blocks", "slots"))
    _checks.check_int_array("indices", indices)
    if shape[0] != B or shape[1] not in (H, K) or shape[2] != nq or shape[3] < 1:
        raise ValueError(
            f"indices has shape {shape}; expected [batch={B}, heads={H} or kv_heads={K}, "
            f"q_blocks=ceil(T / block_q)={nq}, slots >= 1]"
        )
    if extra_mask is not None:
        if not isinstance(extra_mask, Mask):
            raise TypeError(f"extra_mask must be an attnjax.masks mask; got {type(extra_mask).__name__}")
        extra_mask.check(B, H, T, S)
    if key_bias is not None:
        bshape = _checks.check_rank("key_bias", key_bias, ("batch", "heads", "kv_len"))
        _checks.check_float("key_bias", key_bias)
        if bshape[0] != B or bshape[2] != S or bshape[1] not in (1, K, H):
            raise ValueError(
                f"key_bias has shape {bshape}; expected [batch={B}, 1 or {K} or {H}, kv_len={S}]"
            )
    if query_chunk is None:
        query_chunk = max(1, 4096 // block_q)
    query_chunk = _checks.positive_int("query_chunk", query_chunk)
    scale = default_scale(D, scale)
    args = (q, k, v, indices, block_q, block_k, extra_mask, key_bias, scale)
    impls = {
        "reference": lambda: reference.gathered(*args),
        "xla": lambda: xla.gathered(*args, query_chunk),
    }
    out, lse = dispatch.run("gathered_attention", impls, implementation)
    return (out, lse) if return_lse else out


def selected_blocks(indices: Int[Array, "B Hs nq n"], num_k_blocks: int) -> jax.Array:
    """The boolean block map ``[B, Hs, nq, nk]`` of a list of key blocks (a set: padding slots
    outside ``[0, nk)`` and repeats are ignored)."""
    hot = jax.nn.one_hot(indices, num_k_blocks, dtype=jnp.int32)  # out-of-range rows are all zero
    return hot.sum(-2) > 0
