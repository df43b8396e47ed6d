"""MoA masks: heterogeneous causal sliding windows per head, plus sink keys."""

from __future__ import annotations

import jax.numpy as jnp

from attnjax import _checks
from attnjax.core.pytree import pytree_dataclass
from attnjax.masks.base import Mask


@pytree_dataclass(meta=("alpha", "beta", "sinks"))
class MoA(Mask):
    """Heterogeneous causal sliding windows plus sink keys (see :func:`moa`)."""

    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    sinks: int

    def spans(self, kv_len: int) -> tuple[int, ...]:
        """Each head's span ``floor(alpha_h + beta_h * S)`` (keys before and including the query)."""
        return tuple(int(a + b * kv_len) for a, b in zip(self.alpha, self.beta))

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        pos = q_idx + (kv_len - q_len)
        # Each head's span as a sum of selects on Python constants (no array indexed by h, so a
        # kernel reads no table).
        span = sum(jnp.where(h == i, n, 0) for i, n in enumerate(self.spans(kv_len)))  # h's shape
        return (kv_idx <= pos) & ((kv_idx > pos - span) | (kv_idx < self.sinks))

    def bounds(self, tiles, batch):
        # Exact per head. A query at p sees [0, p] minus the gap [sinks, p - span]; over the
        # tile's queries the gaps' union is [sinks, q_hi - span].
        off, span = tiles.offset, jnp.asarray(self.spans(tiles.kv_len), jnp.int32)[None, :, None, None]
        q_lo, q_hi = tiles.q_lo + off, tiles.q_hi + off
        causal_any = tiles.kv_lo <= q_hi
        window_any = (span > 0) & (tiles.kv_hi > q_lo - span)  # some p - span < kv <= p exists
        may_any = causal_any & (window_any | (tiles.kv_lo < self.sinks))
        no_gap = (tiles.kv_hi < self.sinks) | (tiles.kv_lo > q_hi - span) | (self.sinks > q_hi - span)
        return may_any, (tiles.kv_hi <= q_lo) & no_gap

    def check(self, batch, heads, q_len, kv_len):
        if len(self.alpha) != heads:
            raise ValueError(f"moa mask has {len(self.alpha)} heads (alpha, beta); the op has {heads} heads")


def moa(alpha, beta, sinks: int = 0) -> Mask:
    r"""Mixture-of-sparse-attention mask ("MoA: Mixture of Sparse Attention for Automatic Large
    Language Model Compression", Fu et al., 2024): head ``h`` is a causal sliding window whose
    span grows with the input length, plus the first ``sinks`` keys (attention sinks).

    .. math::

        \mathrm{allowed}_h(i, j) = [j \le p_i] \wedge \big([j > p_i - L_h] \vee [j < n_\mathrm{sink}]\big),
        \qquad L_h = \lfloor \alpha_h + \beta_h S \rfloor

    with ``p_i = i + S - T`` (bottom-right alignment) and ``S`` the key length. ``alpha`` and
    ``beta`` are per-head sequences (length ``H``) of non-negative numbers; they are static (part
    of the mask's structure). The block map is exact per head; :func:`attnjax.ops.attention`'s xla
    path reduces it over heads (a tile is skipped only if every head skips it), while
    :func:`attnjax.ops.moa_attention` runs each distinct span separately, so every head skips its
    own tiles.

    >>> from attnjax import masks
    >>> m = masks.moa(alpha=(1, 2), beta=(0.0, 0.25), sinks=1)
    >>> m.spans(6)  # floor(1 + 0 * 6), floor(2 + 0.25 * 6)
    (1, 3)
    >>> m.materialize(6, 6, heads=2)[0, 1].astype(int)  # head 1: key 0 (the sink) + 3 recent keys
    Array([[1, 0, 0, 0, 0, 0],
           [1, 1, 0, 0, 0, 0],
           [1, 1, 1, 0, 0, 0],
           [1, 1, 1, 1, 0, 0],
           [1, 0, 1, 1, 1, 0],
           [1, 0, 0, 1, 1, 1]], dtype=int32)
    """
    alpha = tuple(float(a) for a in alpha)
    beta = tuple(float(b) for b in beta)
    if not alpha or len(alpha) != len(beta):
        raise ValueError(f"moa alpha and beta must be non-empty per-head sequences of one length; got {len(alpha)} and {len(beta)}")
    if min(alpha) < 0 or min(beta) < 0:
        raise ValueError(f"moa alpha and beta must be >= 0; got alpha={alpha}, beta={beta}")
    return MoA(alpha, beta, _checks.positive_int("moa sinks", sinks, allow_zero=True))
