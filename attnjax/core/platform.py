"""The platform the library plans for: JAX's default backend, unless a ``target`` says otherwise.

Dispatch order (:mod:`attnjax.core.dispatch`), tile defaults (:mod:`attnjax.core.blocks`) and the
kernels' compile-or-interpret choice (``kernels_pallas.backend``) all ask :func:`current`, so one
``with platform.target("gpu"):`` makes the whole library build what it would build on a GPU: how
the compile checks lower the kernels for CUDA on a CPU-only machine (docs/kernels.md).
"""

from __future__ import annotations

import contextlib
import threading

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_override = threading.local()


def current() -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"``: the innermost :func:`target`, else JAX's default backend."""
    return getattr(_override, "name", None) or jax.default_backend()


@contextlib.contextmanager
def target(name: str):
    """Plans for platform ``name`` inside the block (for lowering to a device that is not here)."""
    if name not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}; got {name!r}")
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous
