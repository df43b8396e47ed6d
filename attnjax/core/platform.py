"""The platform the library plans for: JAX's default backend, unless a ``target`` says otherwise.

Dispatch order (:mod:`attnjax.core.dispatch`), tile defaults (:mod:`attnjax.core.blocks`) and the
kernels' compile-or-interpret choice (``kernels_pallas.backend``) all ask :func:`current` and
:func:`interpret`, so one ``with platform.target("gpu"):`` makes the whole library build what it
would build on a GPU (how the compile checks lower kernels for CUDA on a CPU-only machine), and
``target("tpu", interpret=True)`` runs the TPU kernels with TPU semantics on a CPU (how the tests
check them against the reference).
"""

from __future__ import annotations

import contextlib
import threading

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_override = threading.local()


def current() -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"``: the innermost :func:`target`, else JAX's default backend."""
    override = getattr(_override, "value", None)
    return override[0] if override else jax.default_backend()


def interpret() -> bool:
    """Whether kernels run in interpret mode: on CPU, or under ``target(..., interpret=True)``;
    compiled on an accelerator and under a plain ``target`` (which lowers for one)."""
    override = getattr(_override, "value", None)
    return override[1] if override else jax.default_backend() not in ("gpu", "tpu")


@contextlib.contextmanager
def target(name: str, *, interpret: bool = False):
    """Plans for platform ``name`` inside the block: kernels compiled for it (for lowering to a
    device that is not here) or, with ``interpret``, run with its semantics in interpret mode."""
    if name not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}; got {name!r}")
    previous = getattr(_override, "value", None)
    _override.value = (name, interpret)
    try:
        yield
    finally:
        _override.value = previous
