"""Flash attention kernels (softmax and elementwise normalizers from one template)."""

from kernels_pallas.flash.kernel import flash_attention

__all__ = ["flash_attention"]
