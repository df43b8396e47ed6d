"""Zoo part 2 (issue 21) 2.14 Block Transformer global-to-local: token-decoder attention
(blocks as batch vs dense reference, values and gradients, f32) and the spec's known answers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import ops
from tests import harness

B, T, H, K, D, E, L, P = 1, 12, 4, 2, 8, 6, 4, 2


def _inputs(seed):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, T, K, D))
    v = jax.random.normal(ks[2], (B, T, K, E))
    pk = jax.random.normal(ks[3], (B, T // L, P, K, D))
    pv = jax.random.normal(ks[4], (B, T // L, P, K, E))
    return q, k, v, pk, pv


def test_block_token_matches_reference():
    def fn(q, k, v, pk, pv, implementation):
        return ops.block_token_attention(q, k, v, L, prefix_k=pk, prefix_v=pv, implementation=implementation)

    harness.check_vjp(
        functools.partial(fn, implementation="xla"),
        functools.partial(fn, implementation="reference"),
        _inputs(0),
        jnp.float32,
        what="block_token_attention",
    )


def test_block_token_known_answers():
    q, k, v, pk, pv = _inputs(1)
    # one block, no prefix: causal attention
    harness.assert_close(ops.block_token_attention(q, k, v, T), ops.attention(q, k, v, is_causal=True), 2e-5, "n=1")
    # outputs of block b do not depend on other blocks' tokens or prefixes, given its own prefix
    out = ops.block_token_attention(q, k, v, L, prefix_k=pk, prefix_v=pv)
    noise = jax.random.normal(jax.random.key(2), k.shape)
    other = jnp.arange(T)[None, :, None, None] // L != 1
    pother = jnp.arange(T // L)[None, :, None, None, None] != 1
    out2 = ops.block_token_attention(
        q, jnp.where(other, k + noise, k), jnp.where(other, v - noise[..., :E], v), L,
        prefix_k=jnp.where(pother, pk + 1.0, pk), prefix_v=jnp.where(pother, pv * 2.0, pv),
    )
    np.testing.assert_array_equal(np.asarray(out[:, L : 2 * L]), np.asarray(out2[:, L : 2 * L]))
    assert not np.allclose(np.asarray(out[:, :L]), np.asarray(out2[:, :L]))
    # the block decoder side: embeddings of concatenated block tokens
    x = jax.random.normal(jax.random.key(3), (B, T, 5))
    w = jax.random.normal(jax.random.key(4), (L * 5, 7))
    e = ops.block_embed(x, w, L)
    harness.assert_close(e[:, 1], x[:, L : 2 * L].reshape(B, -1) @ w, 2e-5, "embed")


def test_block_token_bad_shapes():
    q, k, v, pk, pv = _inputs(5)
    with pytest.raises(ValueError, match="multiple of block"):
        ops.block_token_attention(q, k, v, 5)
    with pytest.raises(ValueError, match="together"):
        ops.block_token_attention(q, k, v, L, prefix_k=pk)
    with pytest.raises(ValueError, match="expected"):
        ops.block_token_attention(q, k, v, L, prefix_k=pk[:, :2], prefix_v=pv[:, :2])
    with pytest.raises(ValueError, match="multiple of block"):
        ops.block_embed(jnp.ones((1, 10, 3)), jnp.ones((12, 2)), 4)
