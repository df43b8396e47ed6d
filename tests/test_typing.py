"""The jaxtyping annotations of the public API are checked at run time against real calls."""

from __future__ import annotations


import jax.numpy as jnp
import pytest
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

from attnjax import masks, ops

checked_attention = jaxtyped(typechecker=beartype)(ops.attention)


def test_annotations_accept_valid_calls():
    q = jnp.zeros((2, 7, 4, 8))
    k = v = jnp.zeros((2, 9, 2, 8))
    out = checked_attention(q, k, v, mask=masks.causal(), bias=jnp.zeros((1, 4, 7, 9)))
    assert out.shape == (2, 7, 4, 8)
    out, lse = checked_attention(q, k, v, return_lse=True)
    assert lse.shape == (2, 7, 4)


def test_annotations_reject_inconsistent_shapes():
    q = jnp.zeros((2, 7, 4, 8))
    k = jnp.zeros((3, 9, 2, 8))  # batch 3 != 2: the "B" dimension is inconsistent
    with pytest.raises(TypeCheckError):
        checked_attention(q, k, k)


def test_masks_annotations():
    doc = jaxtyped(typechecker=beartype)(masks.document)
    doc(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 6), jnp.int32))
    with pytest.raises(TypeCheckError):
        doc(jnp.zeros((2, 5), jnp.int32), jnp.zeros((3, 6), jnp.int32))


