r"""Routing attention ("Efficient Content-Based Sparse Attention with Routing Transformers",
Roy, Saffar, Vaswani and Grangier, TACL 2021).

Queries and keys are clustered by online spherical k-means with ``C`` centroids per head
``mu_{h,c}`` (unit vectors), carried as state between steps. Attention happens within a cluster:

.. math::

    O_t = \frac{\sum_s m_{ts}\, e^{s_{ts}} v_s}{\sum_s m_{ts}\, e^{s_{ts}}}, \qquad
    m_{ts} = \#\{c : t \in \mathcal Q_c,\ s \in \mathcal K_c\} \cdot [s \le t + S - T \text{ if is\_causal}],

with ``s_ts = q_t . k_s / sqrt(D)``. Clusters are *balanced* as in the paper's implementation:
``Q_c`` holds the ``w_q`` queries nearest to ``mu_c`` and ``K_c`` the ``w_k`` nearest keys
(``w_q = ceil(T / C)``, ``w_k = ceil(S / C)`` by default), so every cluster is a dense
``w_q x w_k`` block and a token may sit in several clusters or none. A query in several
clusters merges its per-cluster softmaxes by their log-sum-exps (hence the multiplicity
``m``); a query in no cluster, or whose causal cluster holds no earlier key, gets zeros.
Cost ``O(T * w * D)`` per head, ``O(T^{1.5} D)`` with ``C = sqrt(T)``, instead of ``O(T^2 D)``.

Centroids are state: :func:`routing_init` makes them, :func:`routing_update` returns them moved
towards the mean of the (unit-normalized) queries and keys assigned to them,
``mu <- lambda mu + (1 - lambda) mean(x : x -> mu)``, renormalized. Cluster membership is
discrete and not differentiable: gradients flow to q, k, v for the membership held fixed.

Letter legend: B batch, T query length, S key length, H heads, K key/value heads, D head dim,
E value head dim, C clusters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from attnjax import _checks, masks
from attnjax.core import dispatch
from attnjax.ops.sparse.common import GROUP_IMPLEMENTATION, dense_reference
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention


def routing_init(key: PRNGKeyArray, heads: int, clusters: int, head_dim: int) -> Float[Array, "H C D"]:
    """Random unit-norm centroids ``[H, C, D]`` (float32).

    >>> import jax
    >>> from attnjax import ops
    >>> ops.routing_init(jax.random.key(0), 2, 4, 8).shape
    (2, 4, 8)
    """
    shape = tuple(_checks.positive_int(n, x) for n, x in (("heads", heads), ("clusters", clusters), ("head_dim", head_dim)))
    return _unit(jax.random.normal(key, shape, jnp.float32))


def _unit(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _per_query_head(k, heads):
    """Keys ``[B, S, K, D] -> [B, S, H, D]``: query head ``h`` uses key head ``h // (H // K)``."""
    K = k.shape[2]
    return k if K == heads else jnp.repeat(k, heads // K, axis=2)


def _check_centroids(centroids, H, D):
    shape = _checks.check_rank("centroids", centroids, ("heads", "clusters", "head_dim"))
    _checks.check_float("centroids", centroids)
    if shape[0] != H or shape[2] != D:
        raise ValueError(f"centroids has shape {shape}; expected [heads={H}, clusters, head_dim={D}]")
    return shape[1]


def routing_update(
    centroids: Float[Array, "H C D"],
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    *,
    decay: float = 0.999,
) -> Float[Array, "H C D"]:
    """One online k-means step: each centroid moves to ``decay * mu + (1 - decay) * mean`` of the
    unit-normalized queries and keys nearest to it (over batch and sequence), then is
    renormalized; a centroid nothing was assigned to stays. No gradient flows (pure state update).

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> mu = ops.routing_init(jax.random.key(0), 2, 4, 8)
    >>> q = k = jax.random.normal(jax.random.key(1), (1, 16, 2, 8))
    >>> new = ops.routing_update(mu, q, k, decay=0.9)
    >>> new.shape, bool(jnp.allclose(jnp.linalg.norm(new, axis=-1), 1.0, atol=1e-5))
    ((2, 4, 8), True)
    """
    B, T, S, H, K, D, _ = _checks.check_qkv(q, k, k)
    C = _check_centroids(centroids, H, D)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1]; got {decay}")
    mu = lax.stop_gradient(centroids.astype(jnp.float32))
    x = lax.stop_gradient(jnp.concatenate([_unit(q), _unit(_per_query_head(k, H))], axis=1))  # [B, T+S, H, D]
    nearest = jnp.einsum("bnhd,hcd->bnhc", x, mu, precision=lax.Precision.HIGHEST).argmax(-1)
    onehot = jax.nn.one_hot(nearest, C, dtype=jnp.float32)  # [B, T+S, H, C]
    sums = jnp.einsum("bnhc,bnhd->hcd", onehot, x, precision=lax.Precision.HIGHEST)
    counts = onehot.sum((0, 1))[..., None]  # [H, C, 1]
    moved = decay * mu + (1.0 - decay) * sums / jnp.maximum(counts, 1.0)
    return _unit(jnp.where(counts > 0, moved, mu)).astype(centroids.dtype)


def routing_clusters(
    centroids: Float[Array, "H C D"],
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    *,
    window: int | None = None,
) -> tuple[Int[Array, "B H C wq"], Int[Array, "B H C wk"]]:
    """Balanced cluster members: per head and centroid, the positions (ascending) of the ``wq``
    queries and ``wk`` keys with the largest cosine to the centroid.

    ``window`` sets ``wq = min(window, T)`` and ``wk = min(window, S)``; default
    ``ceil(T / C)`` and ``ceil(S / C)``.
    """
    B, T, S, H, K, D, _ = _checks.check_qkv(q, k, k)
    C = _check_centroids(centroids, H, D)
    wq, wk = (-(-T // C), -(-S // C)) if window is None else (min(window, T), min(window, S))
    if window is not None:
        _checks.positive_int("window", window)
    mu = lax.stop_gradient(_unit(centroids))

    def members(x, w):
        cos = jnp.einsum("bnhd,hcd->bhcn", lax.stop_gradient(_unit(x)), mu, precision=lax.Precision.HIGHEST)
        return jnp.sort(lax.top_k(cos, w)[1], axis=-1).astype(jnp.int32)

    return members(q, wq), members(_per_query_head(k, H), wk)


def routing_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    centroids: Float[Array, "H C D"],
    *,
    window: int | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    """Attention within balanced k-means clusters of queries and keys (see the module docstring).

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, K, D]``, ``[B, S, K, E]`` (``K`` divides ``H``).
      centroids: ``[H, C, D]`` cluster centroids (state; see :func:`routing_update`).
      window: cluster size (see :func:`routing_clusters`).
      is_causal: also require ``s <= t`` (self-attention: needs ``T == S``, so no alignment question).
      scale: logit scale, default ``1 / sqrt(D)``.
      implementation: ``"reference"`` (dense, with the multiplicity matrix ``m``) or
        ``"xla"``/None (gather each cluster, attend within it, merge by log-sum-exp).

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 32, 2, 8))
    >>> mu = ops.routing_init(jax.random.key(1), 2, 4, 8)
    >>> out = ops.routing_attention(q, k, v, mu, is_causal=True)
    >>> ref = ops.routing_attention(q, k, v, mu, is_causal=True, implementation="reference")
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
    ((1, 32, 2, 8), True)
    """
    B, T, S, H, K, D, E = _checks.check_qkv(q, k, v, same_length=is_causal)
    _check_centroids(centroids, H, D)
    q_idx, k_idx = routing_clusters(centroids, q, k, window=window)
    impls = {
        "reference": lambda: _reference(q, k, v, q_idx, k_idx, is_causal, scale),
        "xla": lambda: _gathered(q, k, v, q_idx, k_idx, is_causal, scale),
    }
    return dispatch.run("routing_attention", impls, implementation)


def _reference(q, k, v, q_idx, k_idx, causal, scale):
    T, S = q.shape[1], k.shape[1]
    in_q = jax.nn.one_hot(q_idx, T, dtype=jnp.float32).sum(-2)  # [B, H, C, T]
    in_k = jax.nn.one_hot(k_idx, S, dtype=jnp.float32).sum(-2)  # [B, H, C, S]
    m = jnp.einsum("bhct,bhcs->bhts", in_q, in_k)
    if causal:
        m = m * (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T))
    return dense_reference(q, k, v, m, scale)[0]


def _gathered(q, k, v, q_idx, k_idx, causal, scale):
    B, T, H, D = q.shape
    S, E = k.shape[1], v.shape[-1]
    _, _, C, wq = q_idx.shape
    wk = k_idx.shape[-1]
    heads = lambda x: _per_query_head(x, H).transpose(0, 2, 1, 3)  # [B, H, ., .]
    pick = lambda x, idx: jnp.take_along_axis(x, idx.reshape(B, H, -1, 1), axis=2)
    qg = pick(q.transpose(0, 2, 1, 3), q_idx).reshape(B * H * C, wq, 1, D)
    kg = pick(heads(k), k_idx).reshape(B * H * C, wk, 1, D)
    vg = pick(heads(v), k_idx).reshape(B * H * C, wk, 1, E)
    mask = None
    if causal:
        ok = k_idx[..., None, :] <= q_idx[..., :, None] + (S - T)  # [B, H, C, wq, wk]
        mask = masks.dense(ok.reshape(B * H * C, 1, wq, wk))
    out, lse = attention(qg, kg, vg, mask=mask, scale=scale, return_lse=True, implementation=GROUP_IMPLEMENTATION)
    out = out.astype(jnp.float32).reshape(B * H, C * wq, E)
    lse = lse.reshape(B * H, C * wq)
    # Merge the clusters a query belongs to: a scatter over its position (log-sum-exp weights).
    pos = q_idx.reshape(B * H, C * wq)
    rows = jnp.arange(B * H)[:, None]
    top = jnp.full((B * H, T), -jnp.inf).at[rows, pos].max(lax.stop_gradient(lse))
    top = jnp.where(jnp.isneginf(top), 0.0, top)
    w = jnp.exp(lse - top[rows, pos])  # 0 for clusters where the query saw no key
    num = jnp.zeros((B * H, T, E)).at[rows, pos].add(w[..., None] * out)
    den = jnp.zeros((B * H, T)).at[rows, pos].add(w)
    res = num / jnp.where(den == 0, 1.0, den)[..., None]
    return res.reshape(B, H, T, E).transpose(0, 2, 1, 3).astype(q.dtype)
