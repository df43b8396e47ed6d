r"""All-to-all ("Ulysses") context parallelism: trade the sequence shard for a head shard.

"DeepSpeed Ulysses" (Jacobs et al., 2023): with the sequence sharded over ``P`` devices and at
least ``P`` heads, one ``all_to_all`` per input regroups ``[B, T/P, H, D]`` into
``[B, T, H/P, D]``: every device then holds whole sequences for ``H/P`` heads and runs any
attention op locally (every mask, score mod and kernel, no merging); one more ``all_to_all``
returns the output to the sequence sharding.

**Cost** per device: four all-to-alls moving ``(T H D)/P`` elements each (q, k, v, out) times
``(P-1)/P``, against ring attention's ``P - 1`` transfers of a K/V block; the volume per device
does not grow with ``P``. Needs ``H`` and ``K`` divisible by ``P`` (use the ring otherwise).
"""

from __future__ import annotations

from jax import lax

from attnjax import _checks
from attnjax.ops import attention
from attnjax.core import Shard


def ulysses_attention(q, k, v, *, axis_name: str, batch_shard: tuple | None = None,
                      head_shard: tuple | None = None, **attention_kwargs):
    """:func:`attnjax.ops.attention` on a sequence sharded contiguously along ``axis_name``
    (call inside ``shard_map``), by re-sharding heads with ``all_to_all``.

    Args:
      q, k, v: this device's blocks ``[B, T/P, H, D]``, ``[B, S/P, K, D]``, ``[B, S/P, K, E]``
        (contiguous layout); ``H`` and ``K`` divisible by ``P``.
      axis_name: the mesh axis the sequence is sharded over.
      batch_shard, head_shard: ``(global size, offset)`` when batch or heads are also sharded.
      **attention_kwargs: passed to :func:`attnjax.ops.attention` (mask, score_mod, normalizer,
        dropout, ...), over the global problem. ``return_lse`` is not supported.

    Returns:
      ``[B, T/P, H, E]``, this device's rows.
    """
    B, t, s, H, K, D, E = _checks.check_qkv(q, k, v)
    P = lax.axis_size(axis_name)
    if H % P or K % P:
        raise ValueError(f"ulysses_attention needs heads ({H}) and kv_heads ({K}) divisible by the "
                         f"{P} devices on axis {axis_name!r}; use ring_attention instead")
    if attention_kwargs.get("return_lse"):
        raise ValueError("ulysses_attention does not return the log-sum-exp")
    (gb, b0), (gh, h0) = batch_shard or (B, 0), head_shard or (H, 0)
    me = lax.axis_index(axis_name)
    # [B, t, H, D] -> [B, T, H/P, D]: split heads, gather the sequence (device order = positions).
    to_heads = lambda x: lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)
    shard = Shard.make(batch=gb, heads=gh, q_len=t * P, kv_len=s * P, batch_offset=b0,
                       head_offset=h0 + me * (H // P))
    out = attention(to_heads(q), to_heads(k), to_heads(v), shard=shard, **attention_kwargs)
    return lax.all_to_all(out, axis_name, split_axis=1, concat_axis=2, tiled=True)
