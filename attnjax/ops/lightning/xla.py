r"""Chunked lightning attention in pure JAX ("Lightning Attention-2", Qin et al., 2024).

The sequence is cut into chunks of ``C`` tokens. Inside a chunk the masked quadratic form is
used; across chunks a float32 state carries the past:

.. math::

    O_i = (Q_i K_i^\top \odot M_i) V_i + (Q_i \odot \lambda^{j+1}) S_{i-1},\qquad
    S_i = \lambda^{C} S_{i-1} + (K_i \odot \lambda^{C-1-j})^\top V_i .

Chunks are processed ``CHUNKS_PER_STEP`` at a time in a ``lax.scan`` whose carry is the state:
within a step, every chunk's intra part and state contribution ``U_i`` are computed at once
(batched matmuls, parallel over chunks) and only the cheap recurrence
``S_i = \lambda^C S_{i-1} + U_i`` is sequential. A step's working set is fixed (about a thousand
tokens), so it stays in cache and time per token does not grow with ``T``. Decay exponents are
always ``<= 0`` (no ``\lambda^{-j}`` factoring), so strong decays underflow to 0 instead of
overflowing.

Backward: plain autodiff. Everything the forward keeps is ``O(T)``: the per-chunk masks
``[T/C, C, C]`` (``T C`` floats) and the chunk states ``[T/C, D, E]`` (``T D E / C`` floats),
the same residuals a hand-written backward would keep or recompute, and autodiff also gives
exact gradients of ``log_decay`` (learned decays) for free. The Pallas kernel is where a
hand-written, recomputing backward pays.

Padding to a multiple of ``C`` uses zero keys/values and zero decay, so padded steps leave the
state untouched and the final state is exact. Document resets are masks: a token sees a key
only in its own document, and the carried state only if no boundary lies in between.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attnjax.core.tiling import finite_or_zero
from attnjax.core.utils import log_power, round_up

HI = lax.Precision.HIGHEST
# Chunks processed per sequential step: enough parallel work per step, a working set that stays
# in cache (so time per token does not grow with T).
CHUNKS_PER_STEP = 16


def chunk_steps(length: int, n: int, C: int):
    """``steps[i, j]``: how many decays token ``j`` of chunk ``i`` is from the start of its chunk
    (1 per real token through ``j``, 0 per padding token), ``[n, C]`` int32. A log decay over
    ``m`` steps is :func:`attnjax.core.utils.log_power` ``(a, m)``."""
    real = jnp.clip(length - jnp.arange(n) * C, 0, C)[:, None]  # real tokens per chunk, [n, 1]
    return jnp.minimum(jnp.arange(1, C + 1)[None, :], real).astype(jnp.int32)  # [n, C]


def forward(q, k, v, a, docs, s0, scale, block_size: int):
    B, T, H, D = q.shape
    E = v.shape[-1]
    C = min(block_size, round_up(T, 8))
    g = min(CHUNKS_PER_STEP, -(-T // C))  # chunks per sequential step
    n = round_up(-(-T // C), g)
    pad, L = n * C - T, g * C
    # Whole-array passes (pads, casts, transposes) cost memory bandwidth once T outgrows the
    # cache, so the big arrays only get a free reshape to [steps, B, L, H, *] (moving the size-1
    # batch axis of B=1 is free too); casting, scaling and the [B, H, g, C, *] transpose happen
    # per step, on a cache-sized block.
    steps = lambda x: jnp.moveaxis(
        (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x).reshape(B, n // g, L, H, x.shape[-1]), 1, 0)
    dc = jnp.pad(docs, ((0, 0), (0, pad)), mode="edge").reshape(B, n // g, g, C).transpose(1, 0, 2, 3)
    m = chunk_steps(T, n, C).reshape(n // g, g, C)  # [steps, g, C]
    chunks = lambda x: x.astype(jnp.float32).reshape(B, g, C, H, x.shape[-1]).transpose(0, 3, 1, 2, 4)

    def step(carry, x):
        state, doc_prev = carry  # ([B, H, D, E], its poison [B, H]), [B]
        q_s, k_s, v_s, dc_s, m_s = x  # [B, L, H, *]
        out, state, doc_last = _chunks(state, doc_prev, scale * chunks(q_s), chunks(k_s), chunks(v_s), dc_s, a, m_s)
        return (state, doc_last), out.transpose(0, 2, 3, 1, 4).reshape(B, L, H, E)

    # The state is kept finite; a non-finite initial state becomes its poison (reaching the first
    # document only).
    s0, p0 = finite_or_zero(s0.astype(jnp.float32).reshape(B, H, D * E))
    init = ((s0.reshape(B, H, D, E), p0), docs[:, 0])
    ((final, p_final), _), out = lax.scan(step, init, (steps(q), steps(k), steps(v), dc, m))
    final = final + p_final[..., None, None]
    out = jnp.moveaxis(out, 0, 1).reshape(B, n * C, H, E)  # [steps, B, L, H, E] -> [B, Tp, H, E]
    return (out[:, :T] if pad else out), final


def _chunks(state, doc_prev, qc, kc, vc, dc, a, m):
    """``g`` consecutive chunks at once: ``qc, kc`` ``[B, H, g, C, D]``, ``vc`` ``[B, H, g, C, E]``,
    ``dc`` ``[B, g, C]`` document ids, ``a`` ``[H]`` log decays, ``m`` ``[g, C]`` decay steps
    (:func:`chunk_steps`); ``state = (S [B, H, D, E], its poison [B, H])`` enters the first chunk.

    Non-finite inputs reach only the tokens that attend them (same document, at or after them):
    ``q``, ``k``, ``v`` enter the products zeroed where non-finite, and each row's output gets the
    NaN poison of what it attends (its own query; a non-finite key or value of its document
    earlier in the chunk; the entering state's poison, in the exponent of its decay, which
    ``-inf`` masks). The state stays finite and carries its poison beside it;
    both cross a document boundary by ``where`` (never a multiplication by 0), and only the tokens
    of the document the entering state belongs to read them."""
    C = qc.shape[3]
    qc, pq = finite_or_zero(qc)  # poison [B, H, g, C]
    kc, pk = finite_or_zero(kc)
    vc, pv = finite_or_zero(vc)
    pkv = pk + pv
    ah = a[:, None, None]  # [H, 1, 1]
    prev = jnp.concatenate([doc_prev[:, None], dc[:, :-1, -1]], axis=1)  # doc before each chunk, [B, g]
    j = jnp.arange(C)
    allowed = (j[:, None] >= j[None, :]) & (dc[:, :, :, None] == dc[:, :, None, :])  # [B, g, C, C]
    # exp(-inf) for masked entries (not a where around exp): zero values and zero gradients.
    decay = log_power(ah[..., None], m[:, :, None] - m[:, None, :])  # [H, g, C, C]
    M = jnp.exp(jnp.where(allowed[:, None], decay, -jnp.inf))  # [B, H, g, C, C]
    s = jnp.einsum("bhncd,bhnld->bhncl", qc, kc, precision=HI) * M
    out = jnp.einsum("bhncl,bhnle->bhnce", s, vc, precision=HI)
    # Each row's poison: its own query's, and NaN if it attends a non-finite key or value of the
    # chunk (a matrix-vector product with the mask, a C-th of the chunk's products).
    seen = jnp.einsum("bncl,bhnl->bhnc", allowed.astype(jnp.float32), jnp.isnan(pkv).astype(jnp.float32),
                      precision=HI)
    out = out + (pq + jnp.where(seen > 0, jnp.nan, 0.0))[..., None]

    # Each chunk's contribution to the state after it: its last document's keys, decayed to the
    # end; its poison (NaN if one of those tokens is non-finite) is carried beside the state, so
    # that the state itself stays finite and a token that does not read it never sees a NaN.
    last = m[:, -1]  # [g]
    in_last = (dc == dc[:, :, -1:])[:, None]  # [B, 1, g, C]
    w = jnp.exp(jnp.where(in_last, log_power(ah, last[:, None] - m), -jnp.inf))  # [B, H, g, C]
    U = jnp.einsum("bhncd,bhnce->nbhde", kc * w[..., None], vc, precision=HI)
    pU = jnp.where(in_last, pkv, 0.0).sum(-1)  # [B, H, g]
    cont = dc[:, :, -1] == prev  # [B, g]: the chunk ends in the document it started in
    lam_c = jnp.exp(log_power(a[:, None], last[None, :]))  # [H, g]

    def step(carry, x):
        state, poison = carry  # [B, H, D, E], [B, H]
        cont_i, lam_i, U_i, pU_i = x  # [B], [H], [B, H, D, E], [B, H]
        kept = jnp.where(cont_i[:, None, None, None], lam_i[None, :, None, None] * state, 0.0)
        return (kept + U_i, jnp.where(cont_i[:, None], poison, 0.0) + pU_i), (state, poison)

    state, (before, p_before) = lax.scan(step, state, (cont.T, lam_c.T, U, jnp.moveaxis(pU, 2, 0)))
    # before: [g, B, H, D, E], the state entering each chunk; only tokens of the document it
    # belongs to read it (and its poison, p_before [g, B, H]).
    reads = (dc == prev[..., None])[:, None]  # [B, 1, g, C]
    qw = jnp.exp(jnp.where(reads, log_power(ah, m)[None] + jnp.moveaxis(p_before, 0, -1)[..., None], -jnp.inf))
    out = out + jnp.einsum("bhncd,nbhde->bhnce", qc * qw[..., None], before, precision=HI)
    return out, state, dc[:, -1, -1]
