"""Neighborhood attention (NATTEN semantics) on 1-D, 2-D and 3-D grids: ``api`` (validation and
dispatch), ``reference`` (dense, masked), ``xla`` (query tiles against their key halos) and
``pallas`` (the flash template on tokens permuted tile by tile). The mask is
:mod:`attnjax.masks.neighborhood`."""
