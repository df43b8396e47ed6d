"""The one place that decides how Pallas kernels run on the current platform.

* CPU: interpret mode (the kernels run as ordinary XLA programs; this is what the tests use).
* GPU: compiled through Pallas' Triton lowering; head dims and tiles are padded to powers of
  two >= 16 (Triton's block shapes and tensor-core dots need them).
* TPU: not validated yet, so kernels report NotImplementedError there and ``attnjax`` falls
  back to its XLA path rather than risking a wrong or failing compile.

Every kernel family asks this module, and only this module, about the platform; tile-size
defaults live with :class:`attnjax.core.BlockSizes`.
"""

from __future__ import annotations

import jax

from attnjax.core.blocks import BlockSizes
from attnjax.core.utils import next_pow2, round_up


def platform() -> str:
    """``"gpu"``, ``"tpu"`` or ``"cpu"``."""
    return jax.default_backend()


def interpret() -> bool:
    """Pallas kernels run in interpret mode on CPU (tests), compiled elsewhere."""
    return platform() not in ("gpu", "tpu")


def require_supported(kernel: str) -> None:
    """Declines (NotImplementedError, at trace time) on a platform the kernels are not validated on."""
    if platform() == "tpu":
        raise NotImplementedError(f"the Pallas {kernel} kernels are not validated on TPU")


def pad_head_dim(dim: int) -> int:
    """The head dim a kernel works with: unchanged in interpret mode; a power of two >= 16 on
    GPU (Triton's dot needs it). Padding is with zeros, which leaves dot products unchanged."""
    return dim if interpret() else next_pow2(dim, 16)


def clip_tile(block: int, length: int) -> int:
    """A tile for a sequence of ``length``: at most the (8-rounded) length in interpret mode; a
    power of two >= 16, at most the length's, when compiled."""
    if interpret():
        return min(block, round_up(length, 8))
    return min(next_pow2(block, 16), next_pow2(length, 16))


def flash_tiles(q_len: int, kv_len: int, block_sizes: BlockSizes | None) -> BlockSizes:
    """The flash kernels' tiles: the caller's, else the platform defaults, each clipped."""
    bs = (block_sizes or BlockSizes()).resolve("flash", platform())
    q = lambda n: clip_tile(n, q_len)
    k = lambda n: clip_tile(n, kv_len)
    return BlockSizes(q(bs.block_q), k(bs.block_k), q(bs.block_q_dq), k(bs.block_k_dq),
                      q(bs.block_q_dkv), k(bs.block_k_dkv), bs.spatial)
