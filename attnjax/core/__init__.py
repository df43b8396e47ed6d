"""What every implementation shares and nothing above it: tiling (:class:`Dims`, :class:`Problem`,
:class:`Shard`, tile plans, compaction, tile logits, the online softmax and its merge), tile sizes
and their defaults (:class:`BlockSizes`), dispatch between implementations, precision and small
utilities. It imports nothing from the rest of attnjax but input checks (``_checks``); masks,
score mods, normalizers, ops and the Pallas kernels build on it.
"""

from attnjax.core.blocks import BlockSizes
from attnjax.core.pytree import pytree_dataclass
from attnjax.core.tiling import EMPTY, FULL, PARTIAL, Dims, Problem, Shard
from attnjax.core.utils import default_scale, next_pow2, precision, round_up

__all__ = [
    "BlockSizes", "Dims", "Problem", "Shard", "EMPTY", "PARTIAL", "FULL",
    "pytree_dataclass", "default_scale", "next_pow2", "precision", "round_up",
]
