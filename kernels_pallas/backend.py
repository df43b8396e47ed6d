"""The one place that decides how Pallas kernels run on the current platform."""

from __future__ import annotations

import jax


def platform() -> str:
    """``"gpu"``, ``"tpu"`` or ``"cpu"``."""
    return jax.default_backend()


def interpret() -> bool:
    """Pallas kernels run in interpret mode on CPU (tests), compiled elsewhere."""
    return platform() not in ("gpu", "tpu")
