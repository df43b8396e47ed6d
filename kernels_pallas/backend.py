"""The one place that decides how Pallas kernels run on the current platform.

* CPU: interpret mode (the kernels run as ordinary XLA programs; this is what the tests use).
* GPU: compiled through Pallas' Triton lowering; head dims are padded to a power of two >= 16
  and tiles are 64x64 by default.
* TPU: not validated yet, so kernels report NotImplementedError there and ``attnjax`` falls
  back to its XLA path rather than risking a wrong or failing compile.
"""

from __future__ import annotations

import jax


def platform() -> str:
    """``"gpu"``, ``"tpu"`` or ``"cpu"``."""
    return jax.default_backend()


def interpret() -> bool:
    """Pallas kernels run in interpret mode on CPU (tests), compiled elsewhere."""
    return platform() not in ("gpu", "tpu")


def supports_flash() -> bool:
    return platform() != "tpu"


def pad_head_dim(dim: int) -> int:
    """The head dim a kernel works with: unchanged in interpret mode; a power of two >= 16 on
    GPU (Triton's dot needs it). Padding is with zeros, which leaves dot products unchanged."""
    if interpret():
        return dim
    return max(16, 1 << (dim - 1).bit_length())


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def flash_block_sizes(q_len: int, kv_len: int, block_sizes=None) -> tuple[int, int]:
    """``(block_q, block_k)``: the caller's ``BlockSizes`` or the platform default, clipped to
    the 8-rounded sequence lengths (powers of two on GPU)."""
    if block_sizes is not None:
        bq, bk = block_sizes.block_q, block_sizes.block_k
    else:
        bq = bk = 128 if interpret() else 64
    if interpret():
        return min(bq, _round8(q_len)), min(bk, _round8(kv_len))
    pow2 = lambda n: max(16, 1 << (n - 1).bit_length())
    return min(bq, pow2(q_len)), min(bk, pow2(kv_len))
