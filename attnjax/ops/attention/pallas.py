"""The ``pallas`` implementation of :func:`attnjax.ops.attention`: a thin adapter over the flash
kernels of :mod:`kernels_pallas.flash`, which decline (``NotImplementedError``) what they cannot
serve, so dispatch falls through to ``xla``."""

from __future__ import annotations

from attnjax.core.blocks import BlockSizes
from attnjax.core.tiling import Problem


def attention(problem: Problem, q, k, v, bias, block_sizes: BlockSizes | None = None):
    """Returns ``(out [B, T, H, E], lse [B, T, H])`` like :func:`reference.attention`."""
    from kernels_pallas.flash import flash_attention  # imported lazily: Pallas is heavy to import

    return flash_attention(problem, q, k, v, bias, block_sizes)
