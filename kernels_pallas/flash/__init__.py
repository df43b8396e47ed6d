"""Flash attention kernels (softmax and elementwise normalizers from one template)."""

from .kernel import flash_attention

__all__ = ["flash_attention"]
