"""Implementations of :func:`attnjax.ops.lightning_attention`, one file per backend.

Every implementation receives the same normalized problem (see :mod:`.common`): ``q, k`` as
``[B, T, H, D]`` and ``v`` as ``[B, T, H, E]`` with key/value heads already repeated to ``H``,
a float32 per-head log decay ``a`` ``[H]``, document ids ``docs`` ``[B, T]`` (nondecreasing
int32, 0 everywhere without ``segment_ids``), a float32 initial state ``[B, H, D, E]`` and the
Python float ``scale``. Each returns ``(out [B, T, H, E] float32, final_state [B, H, D, E] float32)``.
"""
