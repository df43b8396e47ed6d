"""Block-sparse flash kernels for neighborhood attention (forward and backward).

:mod:`kernels_pallas.neighborhood.flash` runs softmax attention over the flattened token
sequence, visiting only the key tiles that the mask's exact block map calls non-empty and
evaluating the mask only on PARTIAL tiles.
"""
