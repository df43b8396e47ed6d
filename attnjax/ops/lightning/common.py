"""Pieces shared by the lightning implementations."""

from __future__ import annotations

import jax.numpy as jnp


def doc_ids(segment_ids, batch: int, length: int):
    """Document index of every token, ``[B, T]`` int32: 0 at the start of each row, +1 wherever
    the segment id changes. Boundaries, not id equality, define documents, so a reused id
    (``[0, 1, 0]``) still starts a fresh document."""
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(change, axis=1)], axis=1)
