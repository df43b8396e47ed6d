r"""Recurrent-state passing: lightning and linear attention with the sequence sharded.

Lightning attention's output is linear in the state it starts from:
:math:`o_t = \mathrm{scale}\, q_t (\lambda^{t+1} S_{in} + \sum_{s \le t} \lambda^{t-s} k_s^\top v_s)`.
So each of the ``P`` devices on the axis

1. runs the op on its own chunk from a zero state, getting its outputs and final state
   :math:`S_j`;
2. all-gathers the final states (``P x [B, H, D, E]``, independent of the sequence length) and
   combines them: the state entering chunk ``i`` is
   :math:`F_{i-1}` with :math:`F_j = S_j + \lambda^{n} F_{j-1}` (no carry across a chunk with a
   document boundary, nor into a chunk whose first token starts a new document);
3. corrects its outputs by the incoming state's term :math:`\mathrm{scale}\, q_t \lambda^{t+1}
   S_{in}` (first document of the chunk only).

Non-causal linear attention needs only sums over keys, so shards add their summaries
(``psum``); causal linear attention is lightning attention without decay plus running sums.

**Cost** per device: one all-gather of ``P`` states (``P B H D E`` floats) and an ``O(T D E / P)``
correction; no K/V moves.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attnjax.core.utils import default_scale
from attnjax.ops.lightning import api as lightning_api
from attnjax.ops.linear import api as linear_api
from attnjax.ops.linear import xla as linear_xla
from attnjax.ops.lightning.api import lightning_attention


def lightning_context_parallel(q, k, v, *, axis_name: str, log_decay=None, scale: float | None = None,
                               initial_state=None, return_final_state: bool = False, segment_ids=None,
                               block_size: int | None = None, implementation=None):
    """:func:`attnjax.ops.lightning_attention` over a sequence sharded contiguously along
    ``axis_name`` (call inside ``shard_map``).

    Arguments are those of the op, for this device's chunk (``q`` ``[B, T/P, H, D]``,
    ``segment_ids`` ``[B, T/P]``); ``log_decay`` is per local head and ``initial_state`` is the
    state before the *global* sequence (replicated over the axis). The final state, if asked
    for, is the global one (the same on every device).
    """
    B, t, H, D, E = lightning_api.check_qkv(q, k, v)
    a = lightning_api.check_log_decay(log_decay, H)
    scale = default_scale(D, scale)
    s_in = lightning_api.check_initial_state(initial_state, (B, H, D, E))
    out0, final0 = lightning_attention(q, k, v, log_decay=a, scale=scale, return_final_state=True,
                                       segment_ids=segment_ids, block_size=block_size,
                                       implementation=implementation)
    P, me = lax.axis_size(axis_name), lax.axis_index(axis_name)
    ones = jnp.ones((B,), jnp.float32)
    if segment_ids is None:
        through, joins, first_doc = ones, ones, jnp.ones((B, t), jnp.float32)
    else:
        seg = segment_ids
        through = (seg == seg[:, :1]).all(1).astype(jnp.float32)  # no boundary inside the chunk
        prev_last = lax.ppermute(seg[:, -1], axis_name, [(i, i + 1) for i in range(P - 1)])
        joins = (seg[:, 0] == prev_last).astype(jnp.float32)  # the chunk continues its predecessor's document
        first_doc = jnp.cumprod(seg == seg[:, :1], axis=1).astype(jnp.float32)
    gather = lambda x: lax.all_gather(x, axis_name)
    decay = jnp.exp(a * t)[None, :, None, None]  # lambda^n per head

    def carry(f_prev, xs):
        s_j, through_j, joins_j, j = xs
        col = lambda x: x[:, None, None, None]
        s_enter = jnp.where(j == 0, s_in, col(joins_j) * f_prev)
        return s_j + col(through_j) * decay * s_enter, s_enter

    final, entering = lax.scan(carry, jnp.zeros_like(s_in),
                               (gather(final0), gather(through), gather(joins), jnp.arange(P)))
    s_enter = entering[me]  # [B, H, D, E]
    powers = jnp.exp(a[None, :] * jnp.arange(1, t + 1, dtype=jnp.float32)[:, None])  # lambda^(t+1), [t, H]
    correction = jnp.einsum("bthd,bhde->bthe", q.astype(jnp.float32), s_enter,
                            precision=lax.Precision.HIGHEST)
    correction = scale * correction * powers[None, :, :, None] * first_doc[:, :, None, None]
    out = (out0.astype(jnp.float32) + correction).astype(q.dtype)
    return (out, final) if return_final_state else out


def linear_context_parallel(q, k, v, *, axis_name: str, feature_map="elu1", is_causal: bool = False,
                            normalize=True, implementation=None):
    """:func:`attnjax.ops.linear_attention` over a sequence sharded contiguously along
    ``axis_name`` (call inside ``shard_map``); arguments as the op's, for this device's chunk."""
    norm, phi_q, phi_k, v32 = linear_api.prepare(q, k, v, feature_map, is_causal, normalize)
    if not is_causal:
        sums = lax.psum(linear_xla.summaries(phi_k, v32), axis_name)
        return linear_xla.summed(norm, phi_q, sums).astype(q.dtype)
    P, me, t = lax.axis_size(axis_name), lax.axis_index(axis_name), q.shape[1]
    chunk_sums = lax.all_gather(v32.sum(1, keepdims=True), axis_name)  # [P, B, 1, H, E]
    before = jnp.where((jnp.arange(P) < me)[:, None, None, None, None], chunk_sums, 0.0).sum(0)
    lightning = lambda *a: lightning_context_parallel(*a, axis_name=axis_name, scale=1.0,
                                                      implementation=implementation)
    out = linear_xla.causal(norm, phi_q, phi_k, v32, lightning=lightning, vsum_before=before,
                            count_before=(me * t).astype(jnp.float32))
    return out.astype(q.dtype)
