r"""Lightning attention references, float32: the token recurrence and the dense masked form.

The recurrence is the definition (state ``S_t = \lambda S_{t-1} + k_t^T v_t``, output
``o_t = scale\, q_t S_t``, reset to zero at each document start); the dense form writes the same
sum as one ``[T, T]`` matrix, ``O = (scale\, Q K^T \odot \Lambda) V`` with
``\Lambda_{ts} = \lambda^{t-s} [s \le t][\mathrm{doc}_s = \mathrm{doc}_t]``. Both are short
enough to check against the paper by eye; tests check them against each other.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attnjax.core.tiling import finite_or_zero

HI = lax.Precision.HIGHEST


def recurrence(q, k, v, a, docs, s0, scale):
    """Token-by-token ``lax.scan`` in float32. Returns ``(out [B,T,H,E], final [B,H,D,E])``."""
    f32 = lambda x: x.astype(jnp.float32)
    lam = jnp.exp(a)[None, :, None, None]  # [1, H, 1, 1]
    reset = jnp.concatenate([jnp.zeros_like(docs[:, :1], bool), docs[:, 1:] != docs[:, :-1]], axis=1)

    def step(state, x):
        q_t, k_t, v_t, reset_t = x  # [B, H, D], [B, H, D], [B, H, E], [B]
        decayed = jnp.where(reset_t[:, None, None, None], 0.0, lam * state)
        state = decayed + k_t[..., :, None] * v_t[..., None, :]
        return state, jnp.einsum("bhd,bhde->bhe", scale * q_t, state, precision=HI)

    xs = (jnp.moveaxis(f32(q), 1, 0), jnp.moveaxis(f32(k), 1, 0), jnp.moveaxis(f32(v), 1, 0), reset.T)
    final, out = lax.scan(step, f32(s0), xs)
    return jnp.moveaxis(out, 0, 1), final


def dense(q, k, v, a, docs, s0, scale):
    """The masked quadratic form (materializes ``[B, H, T, T]``). Same returns as :func:`recurrence`.

    Non-finite entries of ``q``, ``k``, ``v`` reach only the tokens that attend them (as in the
    recurrence, where a document boundary replaces the state rather than scaling it by 0): they
    enter the products zeroed, and their NaN poison enters the exponent of the mask, where
    ``-inf`` removes it from the entries that are not attended (``attnjax.core.tiling.guard``)."""
    q, pq = finite_or_zero(q.astype(jnp.float32))  # poison [B, T, H]
    k, pk = finite_or_zero(k.astype(jnp.float32))
    v, pv = finite_or_zero(v.astype(jnp.float32))
    T = q.shape[1]
    t = jnp.arange(T)
    dist = t[:, None] - t[None, :]  # [T, T]
    allowed = (dist >= 0) & (docs[:, :, None] == docs[:, None, :])  # [B, T, T]
    poison = pq.transpose(0, 2, 1)[..., :, None] + (pk + pv).transpose(0, 2, 1)[..., None, :]  # [B, H, T, T]
    # exp of -inf (not a where around exp) so masked entries have zero gradient, never NaN;
    # lambda^0 = 1 even for lambda = 0 (log_decay = -inf).
    expo = jnp.where(dist == 0, 0.0, a[:, None, None] * dist.astype(jnp.float32))  # [H, T, T]
    decay = jnp.exp(jnp.where(allowed[:, None], expo + poison, -jnp.inf))  # [B, H, T, T]
    s = jnp.einsum("bthd,bshd->bhts", scale * q, k, precision=HI) * decay
    out = jnp.einsum("bhts,bshe->bthe", s, v, precision=HI)
    # The initial state reaches the first document only, decayed t + 1 steps.
    pos = (t + 1).astype(jnp.float32)
    first = docs == docs[:, :1]  # [B, T]
    w0 = jnp.where(first[:, :, None], jnp.exp(a[None, None, :] * pos[None, :, None]), 0.0)  # [B, T, H]
    out = out + w0[..., None] * jnp.einsum("bthd,bhde->bthe", scale * q, s0, precision=HI)
    # The final state holds the last document only (and its poison).
    last = (docs == docs[:, -1:])[:, :, None]  # [B, T, 1]
    steps = (T - 1 - t)[:, None]  # [T, 1]
    expo = jnp.where(steps == 0, 0.0, a[None, :] * steps.astype(jnp.float32))  # [T, H]
    w = jnp.exp(jnp.where(last, expo[None] + pk + pv, -jnp.inf))  # [B, T, H]
    final = jnp.einsum("bsh,bshd,bshe->bhde", w, k, v, precision=HI)
    keep0 = jnp.where((docs[:, 0] == docs[:, -1])[:, None], jnp.exp(a * T)[None, :], 0.0)  # [B, H]
    return out, final + keep0[..., None, None] * s0
