"""Lightning attention kernels (forward and backward), see :mod:`.kernel`."""

from kernels_pallas.lightning.kernel import lightning

__all__ = ["lightning"]
