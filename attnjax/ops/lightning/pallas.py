"""The ``pallas`` implementation of :func:`attnjax.ops.lightning_attention`: a thin adapter over
:mod:`kernels_pallas.lightning` (same normalized problem as :mod:`.reference` and :mod:`.xla`)."""

from __future__ import annotations


def forward(q, k, v, a, docs, s0, scale: float, block_size: int):
    """Returns ``(out [B, T, H, E] float32, final_state [B, H, D, E] float32)``."""
    from kernels_pallas.lightning import lightning  # imported lazily: Pallas is heavy to import

    return lightning(q, k, v, a, docs, s0, scale, block_size=block_size)
