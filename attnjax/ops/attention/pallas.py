"""The ``pallas`` implementation of :func:`attnjax.ops.attention`: a thin adapter over the flash
kernels of :mod:`kernels_pallas.flash`, which decline (``NotImplementedError``) what they cannot
serve, so dispatch falls through to ``xla``."""

from __future__ import annotations

from attnjax import _layout
from attnjax.core import dispatch
from attnjax.core.blocks import BlockSizes
from attnjax.core.tiling import Problem


def attention(problem: Problem, q, k, v, bias, block_sizes: BlockSizes | None = None):
    """Returns ``(out [B, T, H, E], lse [B, T, H])`` like :func:`reference.attention`."""
    mode = dispatch.autodiff(q, k, v, bias, problem)
    if mode.forward or mode.reverse_order > 1:
        # The kernels' backward is pallas_call: neither forward mode nor a second derivative can go
        # through it. Declining at trace time lets dispatch fall back (xla serves grad of grad).
        raise NotImplementedError("the Pallas flash kernels serve first-order reverse mode only "
                                  "(implementation='xla' serves grad of grad, 'reference' also jvp)")
    # imported lazily (Pallas is heavy to import), from wherever the kernels are (attnjax._layout)
    flash_attention = _layout.folder("kernels_pallas.flash").flash_attention

    return flash_attention(problem, q, k, v, bias, block_sizes)
