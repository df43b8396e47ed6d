r"""HyperAttention ("HyperAttention: Long-context Attention in Near-Linear Time", Han, Jayaram,
Karbasi, Mirrokni, Woodruff and Zandieh, ICLR 2024).

An approximation of softmax attention ``D^{-1} A V`` (``A = exp(Q K^T / sqrt(d))``) from two
sparse parts. **sortLSH** hashes queries and keys with ``r`` random hyperplanes (an angular LSH;
buckets read as Gray codes, so adjacent buckets differ in one bit), sorts each by bucket and keeps
the block-diagonal of the sorted matrix (blocks of ``b`` keys): the large entries. **Column
sampling** estimates the rest from ``m`` keys drawn uniformly without replacement, each standing
for ``S / m`` keys; sampled entries that already lie in the query's block are dropped, so nothing
is counted twice:

.. math::

    O_i = \frac{\sum_j c_{ij}\, e^{s_{ij}} v_j}{\sum_j c_{ij}\, e^{s_{ij}}}, \qquad
    c_{ij} = [\beta(i) = \beta(j)] + \tfrac{S}{m}\,[j \in \mathcal{S}]\,[\beta(i) \ne \beta(j)],

where ``beta`` is the (sorted-LSH) block of a query or key and ``\mathcal S`` the sample. Both
sums are unbiased over the sample; the estimate is exact when one block holds every key
(``b >= S``) or the sample is every key (``m = S``). Cost ``O((T + S) r D + T (b + m) D)``.

**Causal** (the paper's Algorithm 4): split queries and keys in halves; the diagonal halves
recurse (exact causal attention below ``min_seq_len``), the lower-left block (second-half
queries, first-half keys: unmasked) is the non-causal estimate above, merged with the right
half by log-sum-exp. ``O(T log T (b + m) D)``.

Hashing, sorting and sampling are discrete and drawn from ``key``: gradients flow to q, k, v
for the hashes and sample held fixed (they are computed under ``stop_gradient``). Hashing is per
query head, so grouped-query keys are copied per query head. The reference
implementation computes the same estimate densely, from the same hashes and sample.

Letter legend: B batch, T query length, S key length, H heads, K key/value heads, D head dim,
E value head dim.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from attnjax import _checks, masks
from attnjax.core import dispatch, tiling
from attnjax.core.tiling import Shard
from attnjax.ops.sparse.common import GROUP_IMPLEMENTATION, dense_reference
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention


@dataclasses.dataclass(frozen=True)
class _Config:
    bucket_size: int
    sample_size: int
    num_projections: int
    min_seq_len: int
    scale: float | None
    heads: int  # of the whole problem (a shard's call holds some of them)
    batch_ids: Array  # global index of each batch element, [B]
    head_ids: Array  # global index of each query head, [H]


def _heads(k, H):
    """``[B, S, K, D] -> [B, H, S, D]``: query head ``h`` uses key head ``h // (H // K)``."""
    return jnp.repeat(k, H // k.shape[2], axis=2).transpose(0, 2, 1, 3)


def _plan(key, q, k, cfg):
    """Per (batch, head): the sorted-LSH block of every query ``[B, H, T]`` and key ``[B, H, S]``,
    the sorting permutations, the sample ``[B, H, m]`` and the block sizes."""
    B, T, H, D = q.shape
    S = k.shape[1]
    k_hash, k_sample = jax.random.split(key)
    # Randomness is a function of the key and *global* (batch, head) indices, so a shard of the
    # batch or heads draws exactly its part of the unsharded op's hyperplanes and sample.
    proj = jax.random.normal(k_hash, (cfg.heads, D, cfg.num_projections), jnp.float32)[cfg.head_ids]
    weights = 2 ** jnp.arange(cfg.num_projections - 1, -1, -1, dtype=jnp.int32)

    def bucket(x):  # [B, H, N, D] -> [B, H, N]
        bits = (jnp.einsum("bhnd,hdr->bhnr", lax.stop_gradient(x).astype(jnp.float32), proj) > 0).astype(jnp.int32)
        return ((jnp.cumsum(bits, -1) % 2) * weights).sum(-1)  # Gray code -> rank: neighbours differ by a bit

    q_perm = jnp.argsort(bucket(q.transpose(0, 2, 1, 3)), axis=-1, stable=True)
    k_perm = jnp.argsort(bucket(_heads(k, H)), axis=-1, stable=True)
    nb = -(-S // min(cfg.bucket_size, S))
    bk, bq = -(-S // nb), -(-T // nb)
    rank = lambda perm: jnp.argsort(perm, axis=-1)  # position of each token in sorted order
    q_block, k_block = rank(q_perm) // bq, rank(k_perm) // bk
    m = min(cfg.sample_size, S)
    draw = lambda b, h: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(k_sample, b), h), (S,))
    u = jax.vmap(lambda b: jax.vmap(lambda h: draw(b, h))(cfg.head_ids))(cfg.batch_ids)  # [B, H, S]
    sample = jnp.argsort(u, axis=-1)[..., :m]
    return q_perm, k_perm, q_block, k_block, sample, (nb, bq, bk)


def _noncausal_coeff(key, q, k, cfg):
    _, _, q_block, k_block, sample, _ = _plan(key, q, k, cfg)
    S, m = k.shape[1], sample.shape[-1]
    same = q_block[..., :, None] == k_block[..., None, :]  # [B, H, T, S]
    in_sample = jax.nn.one_hot(sample, S, dtype=jnp.float32).sum(-2)[..., None, :] if m else 0.0
    return jnp.where(same, 1.0, (S / max(m, 1)) * in_sample)


def _causal_coeff(key, q, k, cfg):
    T = q.shape[1]
    if T <= cfg.min_seq_len:
        return jnp.broadcast_to(jnp.tril(jnp.ones((T, T), jnp.float32)), (q.shape[0], q.shape[2], T, T))
    t1 = T // 2
    k_left, k_right, k_cross = jax.random.split(key, 3)
    top = _causal_coeff(k_left, q[:, :t1], k[:, :t1], cfg)
    bottom = jnp.concatenate([_noncausal_coeff(k_cross, q[:, t1:], k[:, :t1], cfg),
                              _causal_coeff(k_right, q[:, t1:], k[:, t1:], cfg)], axis=-1)
    top = jnp.pad(top, ((0, 0), (0, 0), (0, 0), (0, T - t1)))
    return jnp.concatenate([top, bottom], axis=-2)


def _noncausal(key, q, k, v, cfg):
    """The estimate's ``(out [B, T, H, E] float32, lse [B, T, H])``, gathered."""

    B, T, H, D = q.shape
    S, E = k.shape[1], v.shape[-1]
    q_perm, k_perm, q_block, k_block, sample, (nb, bq, bk) = _plan(key, q, k, cfg)
    # Block-diagonal part: sorted queries and keys, block i against block i.
    sort = lambda x, perm, n, pad: jnp.pad(
        jnp.take_along_axis(x, perm[..., None], axis=2), ((0, 0), (0, 0), (0, pad), (0, 0))
    ).reshape(B * H * nb, n, 1, x.shape[-1])
    qs = sort(q.transpose(0, 2, 1, 3), q_perm, bq, nb * bq - T)
    ks, vs = sort(_heads(k, H), k_perm, bk, nb * bk - S), sort(_heads(v, H), k_perm, bk, nb * bk - S)
    mask = None
    if nb * bk != S:  # the last key block is ragged
        lengths = jnp.clip(S - jnp.arange(nb) * bk, 0, bk)
        mask = masks.KeyPrefix(jnp.tile(lengths, B * H).astype(jnp.int32))
    o1, l1 = attention(qs, ks, vs, mask=mask, scale=cfg.scale, return_lse=True, implementation=GROUP_IMPLEMENTATION)
    unsort = lambda x, tail: jnp.take_along_axis(
        x.reshape(B, H, nb * bq, *tail)[:, :, :T], jnp.argsort(q_perm, axis=-1).reshape(B, H, T, *(1,) * len(tail)), axis=2)
    o1 = unsort(o1.astype(jnp.float32), (E,)).transpose(0, 2, 1, 3)
    l1 = unsort(l1, ()).transpose(0, 2, 1)
    m = sample.shape[-1]
    if m == 0:
        return o1, l1
    # Sampled part: every query against the m sampled keys outside its block, each worth S / m.
    pick = lambda x: jnp.take_along_axis(_heads(x, H), sample[..., None], axis=2).transpose(0, 2, 1, 3)
    outside = q_block[..., :, None] != jnp.take_along_axis(k_block, sample, axis=-1)[..., None, :]
    o2, l2 = attention(q, pick(k), pick(v), mask=masks.dense(outside), scale=cfg.scale, return_lse=True,
                       implementation=GROUP_IMPLEMENTATION)
    return tiling.merge([(o1, l1), (o2.astype(jnp.float32), l2 + math.log(S / m))])


def _causal(key, q, k, v, cfg):
    T = q.shape[1]
    if T <= cfg.min_seq_len:
        out, lse = attention(q, k, v, mask=masks.causal(), scale=cfg.scale, return_lse=True, implementation=GROUP_IMPLEMENTATION)
        return out.astype(jnp.float32), lse
    t1 = T // 2
    k_left, k_right, k_cross = jax.random.split(key, 3)
    o1, l1 = _causal(k_left, q[:, :t1], k[:, :t1], v[:, :t1], cfg)
    o2, l2 = _causal(k_right, q[:, t1:], k[:, t1:], v[:, t1:], cfg)
    o3, l3 = _noncausal(k_cross, q[:, t1:], k[:, :t1], v[:, :t1], cfg)
    o2, l2 = tiling.merge([(o2, l2), (o3, l3)])
    return jnp.concatenate([o1, o2], axis=1), jnp.concatenate([l1, l2], axis=1)


def hyper_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    *,
    key: PRNGKeyArray,
    bucket_size: int = 64,
    sample_size: int = 64,
    num_projections: int = 7,
    is_causal: bool = False,
    min_seq_len: int | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
    shard: Shard | None = None,
) -> Float[Array, "B T H E"]:
    """HyperAttention's estimate of softmax attention (see the module docstring).

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, K, D]``, ``[B, S, K, E]`` (``K`` divides ``H``);
        ``T == S`` when ``is_causal``.
      key: randomness of the hyperplanes and the column sample.
      bucket_size: keys per sorted-LSH block ``b`` (query blocks have ``ceil(T / ceil(S / b))``).
      sample_size: sampled columns ``m`` (clipped to ``S``; 0 keeps only the blocks).
      num_projections: hyperplanes ``r`` of the LSH (``2^r`` buckets).
      is_causal: the recursive causal variant (no bottom-right offset: ``T == S``).
      min_seq_len: below this length the causal recursion is exact; default ``2 * bucket_size``.
      scale: logit scale, default ``1 / sqrt(D)``.
      implementation: ``"reference"`` (the same estimate, dense: weights ``c_ij exp(s_ij)``) or
        ``"xla"``/None (sorted blocks and sampled columns gathered).
      shard: for a call on some batch elements and heads of a larger problem
        (:class:`attnjax.ops.Shard`, as :func:`attnjax.parallel.shard_op` passes it): the hashes
        and the sample are drawn for the global batch and head indices, so the shards together
        compute the unsharded estimate. The sequence cannot be sharded.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 256, 2, 16))
    >>> kw = dict(key=jax.random.key(1), bucket_size=32, sample_size=32, is_causal=True)
    >>> out = ops.hyper_attention(q, k, v, **kw)
    >>> ref = ops.hyper_attention(q, k, v, implementation="reference", **kw)
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
    ((1, 256, 2, 16), True)
    """
    B, T, S, H, K, D, E = _checks.check_qkv(q, k, v, same_length=is_causal)
    bucket_size = _checks.positive_int("bucket_size", bucket_size)
    if shard is None:
        shard = Shard.make(batch=B, heads=H, q_len=T, kv_len=S)
    elif not isinstance(shard, Shard):
        raise TypeError(f"shard must be an attnjax.ops.Shard or None; got {type(shard).__name__}")
    elif (shard.q_len, shard.kv_len) != (T, S) or shard.batch < B or shard.heads < H:
        raise ValueError(f"hyper_attention shards batch and heads only: shard (q_len={shard.q_len}, "
                         f"kv_len={shard.kv_len}, batch={shard.batch}, heads={shard.heads}) does not fit "
                         f"q [B={B}, T={T}, H={H}] and kv_len={S}")
    cfg = _Config(
        bucket_size, _checks.positive_int("sample_size", sample_size, allow_zero=True),
        _checks.positive_int("num_projections", num_projections),
        _checks.positive_int("min_seq_len", 2 * bucket_size if min_seq_len is None else min_seq_len),
        scale, shard.heads, shard.batch_offset + jnp.arange(B, dtype=jnp.int32),
        shard.global_heads(jnp.arange(H, dtype=jnp.int32)),
    )

    def reference():
        coeff = (_causal_coeff if is_causal else _noncausal_coeff)(key, q, k, cfg)
        return dense_reference(q, k, v, coeff, scale)[0]

    def gathered():
        out, _ = (_causal if is_causal else _noncausal)(key, q, k, v, cfg)
        return out.astype(q.dtype)

    return dispatch.run("hyper_attention", {"reference": reference, "xla": gathered}, implementation)
