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

from attnjax.core.utils import round_up

HI = lax.Precision.HIGHEST
# Chunks processed per sequential step: enough parallel work per step, a working set that stays
# in cache (so time per token does not grow with T).
CHUNKS_PER_STEP = 16


def chunk_decays(a, length: int, n: int, C: int):
    """``A[h, i, j]``: log decay accumulated from the start of chunk ``i`` through its token
    ``j`` (``a_h`` per real token, 0 per padding token), ``[H, n, C]``."""
    real = jnp.clip(length - jnp.arange(n) * C, 0, C)[:, None]  # real tokens per chunk, [n, 1]
    steps = jnp.minimum(jnp.arange(1, C + 1)[None, :], real)  # [n, C]
    return a[:, None, None] * steps.astype(jnp.float32)


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
    A = chunk_decays(a, T, n, C).reshape(H, n // g, g, C).transpose(1, 0, 2, 3)  # [steps, H, g, C]
    chunks = lambda x: x.astype(jnp.float32).reshape(B, g, C, H, x.shape[-1]).transpose(0, 3, 1, 2, 4)

    def step(carry, x):
        state, doc_prev = carry  # [B, H, D, E], [B]
        q_s, k_s, v_s, dc_s, A_s = x  # [B, L, H, *]
        out, state, doc_last = _chunks(state, doc_prev, scale * chunks(q_s), chunks(k_s), chunks(v_s), dc_s, A_s)
        return (state, doc_last), out.transpose(0, 2, 3, 1, 4).reshape(B, L, H, E)

    (final, _), out = lax.scan(step, (s0.astype(jnp.float32), docs[:, 0]), (steps(q), steps(k), steps(v), dc, A))
    out = jnp.moveaxis(out, 0, 1).reshape(B, n * C, H, E)  # [steps, B, L, H, E] -> [B, Tp, H, E]
    return (out[:, :T] if pad else out), final


def _chunks(state, doc_prev, qc, kc, vc, dc, A):
    """``g`` consecutive chunks at once: ``qc, kc`` ``[B, H, g, C, D]``, ``vc`` ``[B, H, g, C, E]``,
    ``dc`` ``[B, g, C]`` document ids, ``A`` ``[H, g, C]``; ``state`` enters the first chunk."""
    C = qc.shape[3]
    prev = jnp.concatenate([doc_prev[:, None], dc[:, :-1, -1]], axis=1)  # doc before each chunk, [B, g]
    last = A[:, :, -1]  # [H, g]
    j = jnp.arange(C)
    allowed = (j[:, None] >= j[None, :]) & (dc[:, :, :, None] == dc[:, :, None, :])  # [B, g, C, C]
    # exp(-inf) for masked entries (not a where around exp): zero values and zero gradients.
    M = jnp.exp(jnp.where(allowed[:, None], A[..., :, None] - A[..., None, :], -jnp.inf))  # [B,H,g,C,C]
    s = jnp.einsum("bhncd,bhnld->bhncl", qc, kc, precision=HI) * M
    out = jnp.einsum("bhncl,bhnle->bhnce", s, vc, precision=HI)

    # Each chunk's contribution to the state after it: its last document's keys, decayed to the end.
    w = jnp.exp(jnp.where((dc == dc[:, :, -1:])[:, None], last[..., None] - A, -jnp.inf))  # [B,H,g,C]
    U = jnp.einsum("bhncd,bhnce->nbhde", kc * w[..., None], vc, precision=HI)
    keep = jnp.where((dc[:, :, -1] == prev)[:, None], jnp.exp(last)[None], 0.0)  # [B, H, g]

    def step(state, x):
        keep_i, U_i = x
        return keep_i[..., None, None] * state + U_i, state

    state, before = lax.scan(step, state, (jnp.moveaxis(keep, 2, 0), U))
    # before: [g, B, H, D, E], the state entering each chunk.
    qw = jnp.exp(jnp.where((dc == prev[..., None])[:, None], A[None], -jnp.inf))  # [B, H, g, C]
    out = out + jnp.einsum("bhncd,nbhde->bhnce", qc * qw[..., None], before, precision=HI)
    return out, state, dc[:, -1, -1]
