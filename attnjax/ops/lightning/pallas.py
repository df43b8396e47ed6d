"""The ``pallas`` implementation of :func:`attnjax.ops.lightning_attention`: a thin adapter over
:mod:`kernels_pallas.lightning` (same normalized problem as :mod:`.reference` and :mod:`.xla`)."""

from __future__ import annotations

from attnjax import _layout
from attnjax.core import dispatch


def forward(q, k, v, a, docs, s0, scale: float, block_size: int):
    """Returns ``(out [B, T, H, E] float32, final_state [B, H, D, E] float32)``."""
    mode = dispatch.autodiff(q, k, v, a, s0)
    if mode.forward or mode.reverse_order > 1:  # the kernel's backward is a pallas_call
        raise NotImplementedError("the Pallas lightning kernels serve first-order reverse mode only "
                                  "(implementation='xla' or 'reference' serve any order, and jvp)")
    # imported lazily (Pallas is heavy to import), from wherever the kernels are (attnjax._layout)
    lightning = _layout.folder("kernels_pallas.lightning").lightning

    return lightning(q, k, v, a, docs, s0, scale, block_size=block_size)
