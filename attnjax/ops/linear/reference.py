"""Dense reference of :func:`attnjax.ops.linear_attention`: the ``[B, H, T, S]`` weights written
out and normalized as in the papers (float32)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

HI = lax.Precision.HIGHEST
EPS = 1e-6


def safe(den):
    """``den`` with ``|den| < 1e-6`` replaced by ``1e-6``: guards ``d_i ~ 0`` (possible for
    sign-indefinite maps such as identity) against inf/NaN."""
    return jnp.where(jnp.abs(den) < EPS, EPS, den)


def dense(norm, phi_q, phi_k, v, is_causal):
    """The weights ``[B, H, T, S]`` written out and normalized as in the papers."""
    w = jnp.einsum("bthd,bshd->bhts", phi_q, phi_k, precision=HI)
    T, S = w.shape[-2:]
    seen = jnp.tril(jnp.ones((T, S), bool)) if is_causal else jnp.ones((T, S), bool)
    w = jnp.where(seen, w, 0.0)
    den = w.sum(-1, keepdims=True)
    n = seen.sum(-1, keepdims=True).astype(jnp.float32)
    if norm == "standard":
        w = w / safe(den)
    elif norm == "inline":
        w = jnp.where(seen, w - den / n + 1.0 / n, 0.0)
    elif norm == "mala":
        w = jnp.where(seen, (1.0 + 1.0 / safe(den)) * w - den / n, 0.0)
    return jnp.einsum("bhts,bshe->bthe", w, v, precision=HI)
