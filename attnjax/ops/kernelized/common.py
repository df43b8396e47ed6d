"""What the linear-time variants share: input checks, float32 casting with K/V heads repeated,
and the dense causal/full visibility matrix of their references."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attnjax import _checks

HI = lax.Precision.HIGHEST


def prepare(q, k, v, is_causal: bool):
    """Validates ``q [B,T,H,D]``, ``k [B,S,K,D]``, ``v [B,S,K,E]``; returns float32 ``q, k, v``
    with key/value heads repeated to ``H`` (the variants' per-token sums are per query head)."""
    _, T, S, H, K, _, _ = _checks.check_qkv(q, k, v)
    if is_causal and S != T:
        raise ValueError(
            f"is_causal needs kv_len == q_len; got q shape {tuple(q.shape)}, k shape {tuple(k.shape)}"
        )
    f32 = lambda x: x.astype(jnp.float32)
    rep = lambda x: jnp.repeat(f32(x), H // K, axis=2) if H != K else f32(x)
    return f32(q), rep(k), rep(v)


def visible(T: int, S: int, is_causal: bool):
    """``[T, S]`` booleans: which keys each query sees (``j <= i`` when causal)."""
    return jnp.tril(jnp.ones((T, S), bool)) if is_causal else jnp.ones((T, S), bool)


def dense_scores(a, b):
    """``a_i . b_j`` per head: ``[B, H, T, S]`` (float32, highest precision)."""
    return jnp.einsum("bthd,bshd->bhts", a, b, precision=HI)


def weighted(w, v):
    """``sum_j w_ij v_j``: ``[B, H, T, S] x [B, S, H, E] -> [B, T, H, E]``."""
    return jnp.einsum("bhts,bshe->bthe", w, v, precision=HI)
