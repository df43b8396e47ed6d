r"""Loki ("Loki: Low-Rank Keys for Efficient Sparse Attention", Singhania et al., NeurIPS 2024).

Offline, per key/value head, the principal directions of calibration keys: an orthonormal
``P [D, D]`` ordered by decreasing variance (:func:`loki_pca`). At inference the scores of every
key are approximated in the first ``d`` components,

.. math::

    \tilde s_{ij} = (q_i P)_{:d} \cdot (k_j P)_{:d},

each query (and head) keeps its ``top_k`` keys ``j <= p_i`` by ``\tilde s`` (under
``stop_gradient``), and attends exactly over them (``(q P) \cdot (k P) = q \cdot k`` since ``P``
is orthogonal, so the exact scores use ``q`` and ``k`` as they are). The attention is
:func:`attnjax.ops.gathered_attention` with blocks of one token: per query ``O(S d + top_k D)``
instead of ``O(S D)``; the reference is its dense-mask reference. Loki is a decoding method: the
approximate scores ``[B, H, T, S]`` are computed at once (``T`` small), in ``d`` dimensions.

Letter legend: B batch, T queries, S keys, H heads, K key/value heads, D head dim, E value dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attnjax import _checks, masks
from attnjax.core.dispatch import Implementation
from attnjax.core.tiling import scores
from attnjax.ops.gathered.api import gathered_attention


def loki_pca(keys: Float[Array, "N K D"]) -> Float[Array, "K D D"]:
    """Orthonormal principal directions per key head, columns by decreasing variance, from
    calibration keys ``[N, K, D]`` (or ``[B, S, K, D]``, flattened). Uncentred, as the keys are
    used (the paper computes PCA of the keys; centring changes only the ranking of near-ties)."""
    keys = jnp.asarray(keys, jnp.float32)
    keys = keys.reshape(-1, *keys.shape[-2:])
    cov = jnp.einsum("nkd,nke->kde", keys, keys, precision=lax.Precision.HIGHEST)
    _, vecs = jnp.linalg.eigh(cov)  # ascending
    return vecs[..., ::-1]


def loki_indices(q, k, pca, rank: int, top_k: int) -> Array:
    """The kept keys ``[B, H, T, top_k]`` (``-1`` where fewer than ``top_k`` keys are visible)."""
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    qs, ks = lax.stop_gradient(q).astype(jnp.float32), lax.stop_gradient(k).astype(jnp.float32)
    p_q = jnp.repeat(pca[..., :rank], H // K, axis=0)  # [H, D, d]
    q_hat = jnp.einsum("bthd,hdr->bthr", qs, p_q, precision=lax.Precision.HIGHEST)
    k_hat = jnp.einsum("bskd,kdr->bskr", ks, pca[..., :rank], precision=lax.Precision.HIGHEST)
    s = scores(q_hat, k_hat, 1.0)  # [B, H, T, S]
    visible = jnp.arange(S)[None, :] <= (jnp.arange(T) + S - T)[:, None]
    s = jnp.where(visible, s, -jnp.inf)
    val, idx = lax.top_k(s, min(top_k, S))
    return jnp.where(jnp.isneginf(val), -1, idx).astype(jnp.int32)


def loki_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    pca: Float[Array, "K D D"],
    *,
    rank: int,
    top_k: int,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    """Causal (bottom-right) attention over each query's ``top_k`` keys by low-rank scores.

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, K, D]``, ``[B, S, K, E]`` (``T <= S``: the last tokens).
      pca: :func:`loki_pca` of calibration keys, ``[K, D, D]``.
      rank: ``d``, principal components used for selection (``1..D``).
      top_k: keys kept per query and head.
      implementation: of :func:`attnjax.ops.gathered_attention` (the selection is the same).

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    >>> out = ops.loki_attention(q, k, v, ops.loki_pca(k), rank=8, top_k=4)  # everything kept
    >>> bool(jnp.allclose(out, ops.attention(q, k, v, is_causal=True), atol=1e-5))
    True
    """
    B, T, S, H, K, D, _ = _checks.check_qkv(q, k, v)
    if T > S:
        raise ValueError(f"loki_attention needs q_len <= kv_len; got T={T}, S={S}")
    if _checks.check_rank("pca", pca, ("kv_heads", "head_dim", "components")) != (K, D, D):
        raise ValueError(f"pca has shape {pca.shape}; expected [kv_heads={K}, head_dim={D}, {D}]")
    rank = _checks.positive_int("rank", rank)
    if rank > D:
        raise ValueError(f"rank={rank} must be <= head_dim={D}")
    top_k = _checks.positive_int("top_k", top_k)
    idx = loki_indices(q, k, jnp.asarray(pca, jnp.float32), rank, top_k)
    return gathered_attention(q, k, v, idx, 1, 1, masks.causal(), scale=scale, implementation=implementation)
