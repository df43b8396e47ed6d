"""Block-sparse flash kernels for neighborhood attention (forward and backward).

:mod:`kernels_pallas.neighborhood.flash` runs softmax attention over the flattened token
sequence, visiting only the key tiles that the mask's exact block map calls non-empty and
evaluating the mask only on PARTIAL tiles. :func:`attnjax.ops.neighborhood_attention` first
permutes tokens tile by tile (:class:`attnjax.neighborhood.TiledNeighborhood`), so that a kernel
block is a multi-dimensional tile of the grid.
"""
