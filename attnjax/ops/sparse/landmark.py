r"""Landmark attention ("Landmark Attention: Random-Access Infinite Context Length for
Transformers", Mohtashami and Jaggi, NeurIPS 2023).

Keys are cut into blocks of ``l`` tokens; block ``j`` has a landmark key ``L_j`` (in the paper,
the key of a landmark token appended to the block). A query at position ``p`` in block
``c = floor(p / l)`` sees the tokens of its own block up to itself directly, and each earlier
block only through its landmark: the *grouped softmax*

.. math::

    O_p = \frac{\sum_{s \in \mathrm{local}(p)} e^{s_{ps}} v_s
               + \sum_{j \in \mathcal J(p)} e^{s_{p L_j}} \sum_{s \in \mathrm{block}\ j}
                 \mathrm{softmax}_{s' \in \mathrm{block}\ j}(s_{ps'})_s\, v_s}
              {\sum_{s \in \mathrm{local}(p)} e^{s_{ps}} + \sum_{j \in \mathcal J(p)} e^{s_{p L_j}}},

with ``s_{ps} = q_p . k_s / sqrt(D)``, ``local(p) = [c l, p]`` and ``J(p)`` the earlier blocks
``j < c`` (training), or at inference the ``top_k`` of them with the largest landmark scores
``s_{p L_j}`` (retrieval). Equivalently, one softmax over all keys whose logits in an earlier
block ``j`` are shifted by ``s_{p L_j} - logsumexp_{s' in j} s_{ps'}``; the reference computes
exactly that, densely. With retrieval, the gathered path costs
``O(T (S / l + l + top_k l) D)``: landmark scores, then the query's own block and the retrieved
blocks gathered per query (in chunks of queries), instead of ``O(T S D)``. Gathering copies ``(1 + top_k) l`` keys and values
per query, so it pays when ``S`` is much longer than that (decoding over a long cache).

Positions are aligned bottom-right (query ``i`` is at ``p = i + S - T``), as in decoding with a
cache. The top-k choice is not differentiable: gradients flow to q, k, v and the landmark keys
for the retrieved blocks held fixed.

Letter legend: B batch, T query length, S key length, H heads, K key/value heads, D head dim,
E value head dim, n = ceil(S / l) blocks.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attnjax import _checks, masks
from attnjax.core import dispatch, tiling
from attnjax.core.tiling import scores
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention
from attnjax.core.utils import default_scale


def _landmark_scores(q, landmark_k, block_len, top_k, S, scale):
    """``s_{p L_j}`` ``[B, H, T, n]`` with blocks outside ``J(p)`` at ``-inf``, and ``J(p)``'s mask."""
    T = q.shape[1]
    n = landmark_k.shape[1]
    s = scores(q, landmark_k, scale)  # [B, H, T, n] float32
    current = ((jnp.arange(T) + S - T) // block_len)[:, None]  # [T, 1]
    earlier = jnp.arange(n)[None, :] < current  # [T, n]
    if top_k is not None and top_k < n:
        ranked = jnp.where(earlier, lax.stop_gradient(s), -jnp.inf)
        _, idx = lax.top_k(ranked, top_k)
        chosen = jax.nn.one_hot(idx, n, dtype=bool).any(-2)
        earlier = earlier & chosen
    return jnp.where(earlier, s, -jnp.inf), earlier


def landmark_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    landmark_k: Float[Array, "B n K D"],
    *,
    block_len: int,
    top_k: int | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    """Landmark attention with the grouped softmax, optionally retrieving ``top_k`` blocks.

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, K, D]``, ``[B, S, K, E]`` (``K`` divides ``H``, ``T <= S``).
      landmark_k: one landmark key per key block, ``[B, ceil(S / block_len), K, D]`` (a block
        that is some query's own block is seen directly, so its landmark may be anything).
      block_len: tokens per block ``l``.
      top_k: retrieve only the ``top_k`` earlier blocks with the largest landmark scores (per
        query and head); None uses every earlier block (the training form).
      scale: logit scale, default ``1 / sqrt(D)``.
      implementation: ``"reference"`` (dense, shifted logits) or ``"xla"`` (own and retrieved
        blocks gathered; needs ``top_k``). None tries xla, then reference.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 64, 2, 8))
    >>> marks = jax.random.normal(jax.random.key(1), (1, 8, 2, 8))  # one per block of 8
    >>> out = ops.landmark_attention(q, k, v, marks, block_len=8, top_k=2)
    >>> ref = ops.landmark_attention(q, k, v, marks, block_len=8, top_k=2, implementation="reference")
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
    ((1, 64, 2, 8), True)
    """
    B, T, S, H, K, D, E = _checks.check_qkv(q, k, v)
    if T > S:
        raise ValueError(f"landmark attention needs q_len <= kv_len (queries are the last tokens); got T={T}, S={S}")
    block_len = _checks.positive_int("block_len", block_len)
    n = -(-S // block_len)
    lshape = _checks.check_rank("landmark_k", landmark_k, ("batch", "blocks", "kv_heads", "head_dim"))
    if lshape != (B, n, K, D):
        raise ValueError(f"landmark_k has shape {lshape}; expected [batch={B}, blocks=ceil(S / block_len)={n}, kv_heads={K}, head_dim={D}]")
    if landmark_k.dtype != q.dtype:
        raise TypeError(f"landmark_k must have q's dtype {q.dtype}; got {landmark_k.dtype}")
    if top_k is not None:
        top_k = _checks.positive_int("top_k", top_k)
    scale = default_scale(D, scale)
    impls = {
        "reference": lambda: _reference(q, k, v, landmark_k, block_len, top_k, scale),
        "xla": lambda: _retrieval(q, k, v, landmark_k, block_len, top_k, scale),
    }
    return dispatch.run("landmark_attention", impls, implementation)


def _reference(q, k, v, landmark_k, l, top_k, scale):
    T, S = q.shape[1], k.shape[1]
    n = landmark_k.shape[1]
    f32 = lambda x: x.astype(jnp.float32)
    s_land, retrieved = _landmark_scores(f32(q), f32(landmark_k), l, top_k, S, scale)  # [B, H, T, n]
    s = scores(f32(q), f32(k), scale)  # [B, H, T, S]
    blocks = jnp.pad(s, ((0, 0), (0, 0), (0, 0), (0, n * l - S)), constant_values=-jnp.inf)
    block_lse = jax.nn.logsumexp(blocks.reshape(*s.shape[:3], n, l), axis=-1)  # [B, H, T, n]
    of_key = jnp.arange(S) // l
    pos = jnp.arange(T)[:, None] + S - T
    local = (of_key[None, :] == pos // l) & (jnp.arange(S)[None, :] <= pos)  # [T, S]
    far = retrieved[..., of_key]  # [B, H, T, S]
    shift = jnp.where(far, (s_land - jnp.where(retrieved, block_lse, 0.0))[..., of_key], 0.0)
    return attention(q, k, v, mask=masks.dense(far | local), bias=shift, scale=scale, implementation="reference")


def _retrieval(q, k, v, landmark_k, l, top_k, scale):
    if top_k is None:
        raise NotImplementedError("the gathered landmark path retrieves top_k blocks; top_k=None is dense")
    B, T, H, D = q.shape
    S, K, E = k.shape[1], k.shape[2], v.shape[-1]
    n = landmark_k.shape[1]
    kk = min(top_k, n)
    s_land, _ = _landmark_scores(q, landmark_k, l, kk, S, scale)  # [B, H, T, n]
    _, idx = lax.top_k(lax.stop_gradient(s_land), kk)  # earlier blocks first; -inf fills if too few
    land = jnp.take_along_axis(s_land, idx, axis=-1)  # [B, H, T, kk] (keeps the gradient)
    own = (jnp.arange(T) + S - T) // l  # each query's own block
    idx = jnp.concatenate([jnp.broadcast_to(own[:, None], (B, H, T, 1)), idx], axis=-1)  # [B, H, T, 1 + kk]
    pad = lambda x: jnp.pad(x, ((0, 0), (0, n * l - S), (0, 0), (0, 0))).reshape(B, n, l, K, x.shape[-1])
    kb, vb = (pad(x).transpose(0, 3, 1, 2, 4) for x in (k, v))  # [B, K, n, l, .]
    # A row gather per (batch, key head): XLA turns it into a plain copy of whole blocks.
    take = jax.vmap(jax.vmap(lambda table, ids: table[ids]))
    G = H // K
    # One query chunk at a time, so the gathered keys stay O(chunk * (1 + top_k) * l).
    chunk = min(T, 16)  # small chunks: the gathered blocks are (1 + top_k) * l keys per query
    nc = -(-T // chunk)
    tpad = nc * chunk - T
    qc = jnp.pad(q, ((0, 0), (0, tpad), (0, 0), (0, 0))).reshape(B, nc, chunk, K, G, D)
    ic = jnp.pad(idx, ((0, 0), (0, 0), (0, tpad), (0, 0))).reshape(B, K, G, nc, chunk, 1 + kk)
    pc = jnp.pad(jnp.arange(T) + S - T, (0, tpad)).reshape(nc, chunk)  # query positions

    def one(c):
        blk = ic[:, :, :, c]  # [B, K, G, chunk, 1 + kk]
        kg, vg = (take(x, blk.reshape(B, K, -1)).reshape(*blk.shape, l, -1) for x in (kb, vb))  # [B, K, G, chunk, 1 + kk, l, .]
        s = jnp.einsum("bqkgd,bkgqjsd->bkgqjs", qc[:, c].astype(jnp.float32), kg.astype(jnp.float32),
                       precision=lax.Precision.HIGHEST) * scale
        key_pos = blk[..., None] * l + jnp.arange(l)  # [B, K, G, chunk, 1 + kk, l]
        ok = key_pos < S  # padded keys of a ragged last block
        ok = ok.at[..., 0, :].set(ok[..., 0, :] & (key_pos[..., 0, :] <= pc[c][:, None]))  # own block: causal
        s = jnp.where(ok, s, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1)  # finite: a block always holds an allowed key
        o = jnp.einsum("bkgqjs,bkgqjse->bkgqje", jnp.exp(s - lse[..., None]), vg.astype(jnp.float32),
                       precision=lax.Precision.HIGHEST)
        return o.reshape(B, H, chunk, 1 + kk, E), lse[..., 0].reshape(B, H, chunk)

    o, l_own = lax.map(one, jnp.arange(nc))  # [nc, B, H, chunk, 1 + kk, E], [nc, B, H, chunk]
    o = o.transpose(1, 2, 0, 3, 4, 5).reshape(B, H, nc * chunk, 1 + kk, E)[:, :, :T]
    l_own = l_own.transpose(1, 2, 0, 3).reshape(B, H, nc * chunk)[:, :, :T]
    # The own block enters with its log-sum-exp, a retrieved block j with its landmark score.
    parts = [(o[:, :, :, 0], l_own)] + [(o[:, :, :, 1 + j], land[..., j]) for j in range(kk)]
    out, _ = tiling.merge(parts)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)
