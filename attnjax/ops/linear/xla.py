"""Linear attention in ``O(T)``: key summaries for the non-causal form, lightning attention
without decay (chunked) for the causal one. Every function takes float32 ``phi(q)``, ``phi(k)``,
``v`` with key/value heads repeated to ``H`` (see :func:`attnjax.ops.linear.api.prepare`)."""

from __future__ import annotations

import jax.numpy as jnp

from attnjax.ops.lightning.api import lightning_attention
from attnjax.ops.linear.reference import HI, safe


def summaries(phi_k, v):
    """What non-causal linear attention needs of the keys, all sums over them (so shards of the
    sequence combine by adding): ``(sum phi(k)^T v [B,H,D,E], sum phi(k) [B,H,D],
    sum v [B,1,H,E], count)``."""
    return (jnp.einsum("bshd,bshe->bhde", phi_k, v, precision=HI), phi_k.sum(1),
            v.sum(1, keepdims=True), jnp.float32(phi_k.shape[1]))


def summed(norm, phi_q, sums):
    """Non-causal outputs from the key :func:`summaries`."""
    kv, ksum, vsum, count = sums
    num = jnp.einsum("bthd,bhde->bthe", phi_q, kv, precision=HI)
    den = jnp.einsum("bthd,bhd->bth", phi_q, ksum, precision=HI)
    return _finish(norm, num, den, vsum, count)


def causal(norm, phi_q, phi_k, v, implementation=None, lightning=None, vsum_before=0.0, count_before=0):
    """Causal outputs. The sums over ``j <= i`` are lightning attention without decay (a column
    of ones gives ``d_i`` too); a sequence shard passes its own ``lightning`` (state passing)
    and the sum of ``v`` and count of the tokens before it."""
    if lightning is None:
        lightning = lambda *a: lightning_attention(*a, scale=1.0, implementation=implementation)
    T = phi_q.shape[1]
    v_ones = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], -1)
    nd = lightning(phi_q, phi_k, v_ones)
    counts = count_before + jnp.arange(1, T + 1, dtype=jnp.float32)[None, :, None, None]
    return _finish(norm, nd[..., :-1], nd[..., -1], vsum_before + jnp.cumsum(v, axis=1), counts)


def _finish(norm, num, den, vsum, count):
    """Outputs from ``n_i`` ``[B,T,H,E]``, ``d_i`` ``[B,T,H]``, ``sum v`` and ``N_i``."""
    den = den[..., None]
    if norm == "none":
        return num
    if norm == "standard":
        return num / safe(den)
    if norm == "inline":
        return num - den / count * vsum + vsum / count
    return (1.0 + 1.0 / safe(den)) * num - den / count * vsum  # mala
