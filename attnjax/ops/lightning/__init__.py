"""Lightning attention (linear attention with per-head decay, chunked): ``api`` (validation and
dispatch), ``reference`` (the f32 recurrence and the dense form), ``xla`` (chunked scan),
``pallas`` (kernels) and ``common`` (document ids).

Every implementation receives the same normalized problem: ``q, k`` as ``[B, T, H, D]`` and
``v`` as ``[B, T, H, E]`` with key/value heads already repeated to ``H``, a float32 per-head log
decay ``a`` ``[H]``, document ids ``docs`` ``[B, T]`` (nondecreasing int32, 0 everywhere without
``segment_ids``), a float32 initial state ``[B, H, D, E]`` and the Python float ``scale``. Each
returns ``(out [B, T, H, E] float32, final_state [B, H, D, E] float32)``.
"""
