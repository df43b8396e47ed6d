"""Lightning attention kernels (forward and backward), see :mod:`.kernel`."""

from .kernel import lightning

__all__ = ["lightning"]
