"""Small rules every implementation shares, defined once: rounding, the default logit scale, the
matmul precision for an input dtype and powers of a decay given by its logarithm."""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
from jax import lax


def round_up(n: int, m: int) -> int:
    """The smallest multiple of ``m`` that is ``>= n``."""
    return -(-n // m) * m


def next_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two that is ``>= max(n, minimum)``."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def default_scale(head_dim: int, scale: float | None = None) -> float:
    """The logit scale: ``scale`` if given (a Python number), else ``1 / sqrt(head_dim)``.

    A traced or array scale is refused: the scale is static in every implementation (a learned
    temperature is a score mod, :func:`attnjax.score_mods.temperature`). So is a NaN or infinite
    one, which would turn every logit into NaN (``inf * 0``) far from where it was passed."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(
            f"scale must be a Python number (use score_mods.temperature for a learned one); got {scale!r}"
        )
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    return float(scale)


def precision(dtype) -> lax.Precision:
    """Matmul precision for inputs of ``dtype``.

    float32 inputs get float32 matmuls on every backend (TPU/GPU default to bf16/tf32 passes);
    low-precision inputs use the native MXU/tensor-core path with float32 accumulation.
    """
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def log_power(a, m):
    """``log(lambda^m) = a m`` with ``lambda^0 = 1`` even for ``lambda = 0`` (``a = -inf``, no
    memory), where ``a * 0`` would be NaN. ``m >= 0`` are integer step counts (no gradient)."""
    return jnp.where(m == 0, 0.0, a * m.astype(jnp.float32))
