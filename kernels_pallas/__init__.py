"""Pallas kernels for attnjax's hot paths, one folder per kernel family.

The backend (GPU Triton/Mosaic, TPU Mosaic, CPU interpret) is chosen in :mod:`kernels_pallas.backend`.
"""
