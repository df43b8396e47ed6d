"""Tile sizes: one :class:`BlockSizes` for every blockwise path, and the one table of defaults.

``block_sizes=None`` and ``BlockSizes()`` mean the same everywhere: every field left ``None`` is
filled from :data:`DEFAULTS` for the op family and the platform, and the backward tiles default
to the forward ones. Tiles are then clipped to the problem (see each family's implementation).

Algorithmic block sizes (HyperAttention's LSH buckets, landmark attention's memory blocks,
MaxViT's windows) change *what* is computed and are arguments of their ops, never tile sizes.
"""

from __future__ import annotations

import dataclasses

from attnjax import _checks
from attnjax.core import platform as platform_lib


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the blockwise implementations (``xla`` and ``pallas``).

    Attributes:
      block_q, block_k: query and key tile of the forward pass (for lightning attention,
        ``block_q`` is the chunk length).
      block_q_dq, block_k_dq: tiles of the Pallas ``dq`` kernel (default: the forward's).
      block_q_dkv, block_k_dkv: tiles of the Pallas ``dk, dv`` kernel (default: the forward's).
      spatial: the query tile shape of spatial ops (neighborhood attention), one entry per
        spatial axis; its kernel's tile is ``prod(spatial)`` tokens.

    The xla path recomputes its backward over the forward's tiles, so it uses ``block_q`` and
    ``block_k`` only.

    >>> BlockSizes(block_q=128).resolve("xla", "cpu")
    BlockSizes(block_q=128, block_k=256, block_q_dq=128, block_k_dq=256, block_q_dkv=128, block_k_dkv=256, spatial=None)
    """

    block_q: int | None = None
    block_k: int | None = None
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None
    spatial: tuple[int, ...] | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "spatial":
                if value is not None:
                    if not isinstance(value, tuple) or not 1 <= len(value) <= 3:
                        raise TypeError(f"BlockSizes.spatial must be a tuple of 1 to 3 ints; got {value!r}")
                    for i, n in enumerate(value):
                        _checks.positive_int(f"BlockSizes.spatial[{i}]", n)
            elif value is not None:
                _checks.positive_int(f"BlockSizes.{f.name}", value)

    @property
    def forward(self) -> tuple[int, int]:
        return self.block_q, self.block_k

    @property
    def dq(self) -> tuple[int, int]:
        return self.block_q_dq, self.block_k_dq

    @property
    def dkv(self) -> tuple[int, int]:
        return self.block_q_dkv, self.block_k_dkv

    def resolve(self, family: str, platform: str | None = None) -> "BlockSizes":
        """Every field filled: from this object, else :data:`DEFAULTS` for ``family`` on
        ``platform`` (default: :func:`attnjax.core.platform.current`); backward tiles from the forward's."""
        platform = platform or platform_lib.current()
        default = DEFAULTS.get((family, platform)) or DEFAULTS[(family, "any")]
        pick = lambda name: getattr(self, name) if getattr(self, name) is not None else getattr(default, name)
        bq, bk = pick("block_q"), pick("block_k")
        or_ = lambda name, fallback: getattr(self, name) if getattr(self, name) is not None else fallback
        return BlockSizes(bq, bk, or_("block_q_dq", bq), or_("block_k_dq", bk),
                          or_("block_q_dkv", bq), or_("block_k_dkv", bk), self.spatial)


DEFAULTS: dict[tuple[str, str], BlockSizes] = {
    # Blockwise XLA attention. Measured for causal attention at T=8K on a 2-core CPU:
    # 256x256 0.78 s, 512x512 0.91 s, 1024x1024 1.42 s, 256x1024 0.74 s; small key tiles also
    # skip more of sparse masks. Remeasured after the heads-first layout (issue 19; CPU seconds,
    # interleaved, causal 4K): forward 256x256 0.156, 512x256 0.156, 512x512 0.157, 256x512 0.163,
    # 128x256 0.170, 128x128 0.210; forward+backward 256x256 0.54, 512x256 0.58, 128x256 0.59,
    # 256x512 0.66; sliding window 256 at 8K 128x128 0.113, 256x256 0.119, 512x512 0.173.
    ("xla", "any"): BlockSizes(256, 256),
    # Pallas flash kernels: 128 in interpret mode (fewer, larger XLA programs); 64 on GPU, the
    # largest square tile whose fp32 accumulators stay in registers for D <= 128.
    ("flash", "cpu"): BlockSizes(128, 128),
    ("flash", "gpu"): BlockSizes(64, 64),
    # TPU (Mosaic): multiples of the 128-wide MXU and lanes; 512 amortizes the ~0.35 us per grid
    # step and keeps a tile's f32 logits (1 MiB) and their backward temporaries well inside the
    # 16 MiB scoped VMEM of v5e (compile table in docs/kernels.md).
    ("flash", "tpu"): BlockSizes(512, 512),
    ("flash", "any"): BlockSizes(128, 128),
    # Lightning attention: the chunk length of the xla and Pallas paths.
    ("lightning", "any"): BlockSizes(64, 64),
    # TPU: chunks are multiples of the 128 lanes (kernels_pallas/lightning/tpu.py).
    ("lightning", "tpu"): BlockSizes(128, 128),
}

SPATIAL_TILES: dict[int, tuple[int, ...]] = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}
"""Default query tile shape of spatial ops, by number of spatial axes."""


def spatial_tile(block_sizes: BlockSizes | None, extents: tuple[int, ...]) -> tuple[int, ...]:
    """The query tile shape for a grid of ``extents``: ``block_sizes.spatial`` or the default
    for its rank, clipped to the grid."""
    tile = (block_sizes.spatial if block_sizes is not None else None) or SPATIAL_TILES[len(extents)]
    if len(tile) != len(extents):
        raise ValueError(f"BlockSizes.spatial={tile} needs one entry per spatial axis; the grid is {extents}")
    return tuple(min(t, n) for t, n in zip(tile, extents))


def check(block_sizes) -> None:
    """Raises TypeError unless ``block_sizes`` is None or a :class:`BlockSizes`."""
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be an attnjax.ops.BlockSizes or None; got {block_sizes!r}")
