"""Dense reference: materializes the ``[B, H, T, S]`` score matrix, float32 throughout.

Obviously correct by construction and differentiated by plain autodiff (any order, forward or
reverse mode); every faster path is tested against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core import tiling
from attnjax.normalizers import MASKED
from attnjax.core.tiling import Problem


def attention(problem: Problem, q, k, v, bias):
    """Returns ``(out [B, T, H, E] in q.dtype, lse [B, T, H] float32)``.

    ``lse`` is the log-sum-exp of each row's allowed logits (``-inf`` for a row with no allowed
    key) for softmax, and zeros for elementwise normalizers.
    """
    d, dtype = problem.dims, q.dtype
    f32 = lambda x: x.astype(jnp.float32)
    q_idx = jnp.arange(d.q_len, dtype=jnp.int32)
    kv_idx = jnp.arange(d.kv_len, dtype=jnp.int32)
    # Non-finite entries of q, k, v reach only the entries the mask allows (tiling.guard): the
    # whole matrix is treated as one PARTIAL tile.
    q, k, v, poison = tiling.guard(f32(q), f32(k), f32(v))
    s = tiling.logits(problem, problem.score_mod, q, k, bias, q_idx, kv_idx) + poison
    allowed = jnp.broadcast_to(tiling.allowed(problem, q_idx, kv_idx), s.shape)
    w = problem.normalizer.dense(problem.lengths[1], s, allowed)  # [B, H, T, S]
    zs = tiling.dropout_scale(problem, q_idx, kv_idx)
    if zs is not None:
        w = w * zs
    out = tiling.weighted_values(w, v)  # [B, H, T, E]
    if problem.normalizer.row_normalized:
        any_allowed = allowed.any(-1)
        # A finite fill keeps the gradient of fully masked rows finite (it is then discarded).
        lse = jax.nn.logsumexp(jnp.where(allowed, s, MASKED), axis=-1)
        lse = jnp.where(any_allowed, lse, -jnp.inf)
    else:
        lse = jnp.zeros(s.shape[:-1], jnp.float32)
    return out.transpose(0, 2, 1, 3).astype(dtype), lse.transpose(0, 2, 1)
