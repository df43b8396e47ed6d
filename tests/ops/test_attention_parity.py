"""Parity with ``jax.nn.dot_product_attention`` where it supports the same case.

jax.nn aligns ``is_causal`` top-left, so causal cases use T == S (where both alignments agree).
Its ``local_window_size=(left, right)`` is our ``sliding_window(left, right)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks, ops
from tests import harness
from tests.harness import Shape

CASES = {
    "causal": (dict(is_causal=True), dict(mask=masks.causal())),
    "window": (dict(local_window_size=(5, 3)), dict(mask=masks.sliding_window(5, 3))),
    "causal_window": (dict(is_causal=True, local_window_size=(7, 0)), dict(mask=masks.sliding_window(7))),
    "full": ({}, {}),
}


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [Shape(B=2, T=45, S=45, H=4, K=2, D=32, E=32),
                                   Shape(B=1, T=64, S=64, H=2, K=1, D=16, E=16)], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_jax_nn(case, shape, dtype, impl):
    jax_kw, our_kw = CASES[case]
    ours = lambda q, k, v: ops.attention(q, k, v, implementation=impl,
                                         block_sizes=ops.BlockSizes(16, 16), **our_kw)
    theirs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **jax_kw)
    # Both run in `dtype`; jax.nn computes softmax probabilities in the input dtype, so the
    # tolerance is that of the dtype against an f32 computation.
    harness.check_vjp(ours, theirs, shape.qkv(jax.random.key(0)), dtype, what=case)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_bias_matches_jax_nn(impl):
    s = Shape(B=2, T=30, S=50, H=4, K=4, D=16, E=16)
    bias = harness.normal(jax.random.key(5), (1, s.H, s.T, s.S))
    ours = lambda q, k, v, b: ops.attention(q, k, v, bias=b, implementation=impl, block_sizes=ops.BlockSizes(16, 16))
    theirs = lambda q, k, v, b: jax.nn.dot_product_attention(q, k, v, bias=b)
    harness.check_vjp(ours, theirs, (*s.qkv(jax.random.key(0)), bias), jnp.float32)


def test_lse_matches_jax_nn_residual():
    s = Shape(B=1, T=32, S=32, H=2, K=2, D=16, E=16)
    q, k, v = s.qkv(jax.random.key(0))
    _, lse = ops.attention(q, k, v, mask=masks.causal(), return_lse=True, implementation="xla")
    _, their_lse = jax.nn.dot_product_attention(q, k, v, is_causal=True, return_residual=True)
    harness.assert_close(lse, their_lse, 1e-5, "lse")
