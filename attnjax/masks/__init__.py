"""Attention masks: analytic predicates, their algebra, and block maps.

A mask answers one question: may query position ``q_idx`` attend to key position ``kv_idx``
(in batch element ``b``, query head ``h``)? Masks combine with ``&``, ``|`` and ``~``.

**Alignment.** With ``T`` queries and ``S`` keys, positional masks (``causal``,
``sliding_window``, ``chunked``, ``prefix_lm``) align queries with the *end* of the key
sequence ("bottom-right", as in decoding with a cache): query ``i`` sits at absolute position
``i + S - T``. With ``T == S`` this is the usual alignment; with ``T < S`` the queries are the
last ``T`` tokens; with ``T > S`` the first ``T - S`` queries see no key under ``causal`` and
give zeros.

**Padding.** :func:`padding` (``lengths`` per batch element, optionally ``q_lengths``) hides
the padded keys (and queries) at the end of each sequence, on raw positions.

**Block maps.** For tile sizes ``(block_q, block_k)`` a mask classifies every tile of the
``[T, S]`` score matrix as ``EMPTY`` (nothing allowed: skipped), ``FULL`` (everything allowed:
no mask evaluation) or ``PARTIAL``, from the mask's formula applied to each tile's index bounds
(interval arithmetic), never from a materialized ``[T, S]`` array (see :mod:`attnjax.masks.base`).

Modules: :mod:`~attnjax.masks.base` (the :class:`Mask` contract, the algebra, ``from_fn``),
:mod:`~attnjax.masks.positional`, :mod:`~attnjax.masks.document`,
:mod:`~attnjax.masks.neighborhood`, :mod:`~attnjax.masks.moa`, :mod:`~attnjax.masks.grid`
(MaxViT, HaloNet), :mod:`~attnjax.masks.dense`.

>>> from attnjax import masks
>>> m = masks.causal() & masks.sliding_window(2)
>>> m.materialize(4, 4)[0, 0].astype(int)
Array([[1, 0, 0, 0],
       [1, 1, 0, 0],
       [1, 1, 1, 0],
       [0, 1, 1, 1]], dtype=int32)
>>> m.block_map(8, 8, block_q=2, block_k=2)[0, 0]
Array([[1, 0, 0, 0],
       [1, 1, 0, 0],
       [0, 1, 1, 0],
       [0, 0, 1, 1]], dtype=int8)
"""

from attnjax.masks.base import (
    EMPTY, FULL, PARTIAL, And, FromFn, Mask, Not, Or, Tiles, collapse, evaluate_bounds, from_fn, grid_indices,
)
from attnjax.masks.dense import Dense, dense
from attnjax.masks.document import Document, document
from attnjax.masks.grid import block_mask, grid_mask, halo_mask
from attnjax.masks.moa import MoA, moa
from attnjax.masks.neighborhood import Neighborhood, TiledNeighborhood, axis_windows, neighborhood
from attnjax.masks.positional import (
    Causal, Chunked, KeyPrefix, QueryPrefix, SlidingWindow, causal, chunked, padding, prefix_lm, sliding_window,
)

__all__ = [
    "EMPTY", "PARTIAL", "FULL", "Mask", "Tiles", "And", "Or", "Not", "FromFn", "from_fn",
    "collapse", "evaluate_bounds", "grid_indices",
    "Causal", "SlidingWindow", "Chunked", "KeyPrefix", "QueryPrefix", "causal", "sliding_window", "chunked",
    "prefix_lm", "padding",
    "Document", "document", "MoA", "moa", "Dense", "dense", "block_mask", "grid_mask", "halo_mask",
    "Neighborhood", "TiledNeighborhood", "axis_windows", "neighborhood",
]

# Zoo part 2 (issue 21): top-k key masks (Dynamic Mask Attention).
from attnjax.masks.topk import TopKeys, prefix_thresholds, topk_keys

__all__ += ["TopKeys", "prefix_thresholds", "topk_keys"]

# Zoo part 4 (issue 23): masks by token type (cross-modal rules).
from attnjax.masks.by_type import (
    ByType, Heads, by_type, composite, isolation, mixformer, modality_mutual, speaker_heads, vidt,
)

__all__ += ["ByType", "Heads", "by_type", "composite", "isolation", "mixformer", "modality_mutual", "speaker_heads",
            "vidt"]
