"""The gathered path of :func:`attnjax.ops.gathered_attention`: per query block, gather the
listed key blocks and attend over them with one small dense ``ops.attention`` (its reference path:
a gathered group has nothing to skip inside), ``query_chunk`` query blocks at a time (``lax.map``
with a batch size), so memory is ``O(T (D + E) + query_chunk b_q n b_k)`` per head and time
``O(T n b_k D)``."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attnjax import masks
from attnjax.ops.attention.api import attention

GROUP_IMPLEMENTATION = "reference"
"""How one query block's gathered keys are attended: a small dense problem (see
:data:`attnjax.ops.sparse.common.GROUP_IMPLEMENTATION`)."""


def slot_ok(indices, nk):
    """Which slots count ``[..., n]``: in ``[0, nk)`` and not a repeat of an earlier slot (the
    reference's set semantics)."""
    n = indices.shape[-1]
    earlier = jnp.tril(jnp.ones((n, n), bool), -1)
    repeated = ((indices[..., :, None] == indices[..., None, :]) & earlier).any(-1)
    return (indices >= 0) & (indices < nk) & ~repeated


def gathered(q, k, v, indices, block_q, block_k, extra_mask, key_bias, scale, query_chunk):
    B, T, H, D = q.shape
    S, K, E = k.shape[1], k.shape[2], v.shape[-1]
    Hs, n = indices.shape[1], indices.shape[3]
    Gs = H // Hs
    nq, nk = -(-T // block_q), -(-S // block_k)
    L = n * block_k
    ok = slot_ok(indices, nk)  # [B, Hs, nq, n]
    idx = jnp.clip(indices, 0, nk - 1)
    kv_of = (jnp.arange(Hs) * K) // Hs  # the key/value head of each selection head

    def blocks(x):  # [B, S, K, .] -> [B, K, nk, bk, .]
        x = jnp.pad(x, ((0, 0), (0, nk * block_k - S), (0, 0), (0, 0)))
        return x.reshape(B, nk, block_k, K, x.shape[-1]).transpose(0, 3, 1, 2, 4)

    kb, vb = blocks(k), blocks(v)
    if key_bias is not None:  # [B, Hb, S] -> [B, Hs, Gs, nk, bk] float32 (per query head)
        kbias = jnp.repeat(key_bias.astype(jnp.float32), H // key_bias.shape[1], axis=1)
        kbias = jnp.pad(kbias, ((0, 0), (0, 0), (0, nk * block_k - S))).reshape(B, Hs, Gs, nk, block_k)
    qb = jnp.pad(q, ((0, 0), (0, nq * block_q - T), (0, 0), (0, 0))).reshape(B, nq, block_q, Hs, Gs, D)
    b_ix = jnp.arange(B)[:, None, None]
    h_ix = kv_of[None, :, None]
    b4, h4 = jnp.arange(B)[:, None, None, None], jnp.arange(H)[None, :, None, None]

    def one(xs):
        i, qi, ii, oki = xs  # block id, [B, bq, Hs, Gs, D], [B, Hs, n], [B, Hs, n]
        kg = kb[b_ix, h_ix, ii].reshape(B * Hs, L, 1, D)  # one gather of whole blocks
        vg = vb[b_ix, h_ix, ii].reshape(B * Hs, L, 1, E)
        pos = (ii[..., None] * block_k + jnp.arange(block_k)).reshape(B, Hs, L)
        allowed = (oki[..., None] & (pos.reshape(B, Hs, n, block_k) < S)).reshape(B, Hs, 1, 1, L)
        allowed = jnp.broadcast_to(allowed, (B, Hs, Gs, block_q, L))
        if extra_mask is not None:
            q_idx = (i * block_q + jnp.arange(block_q))[None, None, :, None]
            kv_idx = jnp.repeat(pos, Gs, axis=1)[:, :, None, :]  # [B, H, 1, L]
            extra = extra_mask.predicate(T, S, b4, h4, q_idx, kv_idx)
            allowed = allowed & jnp.broadcast_to(extra, (B, H, block_q, L)).reshape(B, Hs, Gs, block_q, L)
        bias = None
        if key_bias is not None:
            bias = jnp.take_along_axis(kbias, ii[:, :, None, :, None], axis=3).reshape(B * Hs, Gs, 1, L)
        qg = qi.transpose(0, 2, 1, 3, 4).reshape(B * Hs, block_q, Gs, D)
        out, lse = attention(
            qg,
            kg,
            vg,
            bias=bias,
            mask=masks.dense(allowed.reshape(B * Hs, Gs, block_q, L)),
            scale=scale,
            return_lse=True,
            implementation=GROUP_IMPLEMENTATION,
        )
        out = out.reshape(B, Hs, block_q, Gs, E).transpose(0, 2, 1, 3, 4).reshape(B, block_q, H, E)
        lse = lse.reshape(B, Hs, block_q, Gs).transpose(0, 2, 1, 3).reshape(B, block_q, H)
        return out, lse

    xs = (jnp.arange(nq), qb.transpose(1, 0, 2, 3, 4, 5), idx.transpose(2, 0, 1, 3), ok.transpose(2, 0, 1, 3))
    out, lse = lax.map(one, xs, batch_size=min(query_chunk, nq))  # [nq, B, bq, H, .]
    out = out.transpose(1, 0, 2, 3, 4).reshape(B, nq * block_q, H, E)[:, :T]
    lse = lse.transpose(1, 0, 2, 3).reshape(B, nq * block_q, H)[:, :T]
    return out, lse
