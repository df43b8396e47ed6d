"""Zoo part 2 (issue 21): gathered attention from index sets (C2), partial attentions and their
reweighting (C5), coefficient-weighted softmax with coefficient gradients (C6), and the
long-context mechanisms built on them.

Each efficient path is checked against its dense reference with ``harness.check_vjp`` (values and
gradients; float32 and bfloat16; ragged lengths that are not multiples of the blocks; GQA), the
discrete selections computed identically on both sides (held fixed for gradients), plus each
mechanism's known-answer property from ZOO_SPECS.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, ops
from tests import harness
from tests.harness import Shape

GQA = Shape(B=2, T=37, S=45, H=4, K=2, D=12, E=10)  # ragged for every block size used below
DTYPES = pytest.mark.parametrize(
    "dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)], ids=["f32", "bf16"]
)


def _vjp(op, args, dtype=jnp.float32, **kw):
    harness.check_vjp(
        functools.partial(op, implementation="xla", **kw),
        functools.partial(op, implementation="reference", **kw),
        args,
        dtype,
        what=getattr(op, "__name__", "op"),
    )


# -- C2 gathered attention -----------------------------------------------------------------------


def _indices(key, B, Hs, nq, nk, n):
    """Random lists with padding slots (-1), out-of-range entries and repeats."""
    idx = jax.random.randint(key, (B, Hs, nq, n), -1, nk + 1)
    return idx.at[..., -1].set(idx[..., 0])  # a repeat in every list


@DTYPES
@pytest.mark.parametrize("heads", ["kv", "q"])
def test_gathered_matches_reference(dtype, heads):
    q, k, v = GQA.qkv(jax.random.key(0))
    Hs = GQA.K if heads == "kv" else GQA.H
    idx = _indices(jax.random.key(1), GQA.B, Hs, -(-GQA.T // 8), -(-GQA.S // 16), 3)
    bias = harness.normal(jax.random.key(2), (GQA.B, GQA.K, GQA.S))

    def op(q, k, v, bias, implementation):
        out, lse = ops.gathered_attention(
            q,
            k,
            v,
            idx,
            8,
            16,
            masks.causal(),
            key_bias=bias,
            return_lse=True,
            query_chunk=2,
            implementation=implementation,
        )
        return out, jnp.where(jnp.isneginf(lse), 0.0, lse)  # rows with no key: -inf on both sides

    harness.check_vjp(
        functools.partial(op, implementation="xla"),
        functools.partial(op, implementation="reference"),
        (q, k, v, bias),
        dtype,
        what="gathered",
    )


def test_gathered_document_mask_per_query_head_bias():
    q, k, v = GQA.qkv(jax.random.key(3))
    idx = _indices(jax.random.key(4), GQA.B, GQA.K, 5, 3, 2)
    seg = jnp.asarray(harness.segments(0, GQA.B, GQA.S))
    mask = masks.document(seg[:, -GQA.T :], seg)
    bias = harness.normal(jax.random.key(5), (GQA.B, GQA.H, GQA.S))
    _vjp(
        lambda q, k, v, b, implementation: ops.gathered_attention(
            q, k, v, idx, 8, 16, mask, key_bias=b, implementation=implementation
        ),
        (q, k, v, bias),
    )


def test_gathered_all_blocks_is_attention():
    q, k, v = GQA.qkv(jax.random.key(6))
    nk = -(-GQA.S // 16)
    idx = jnp.broadcast_to(jnp.arange(nk)[::-1], (GQA.B, GQA.K, 5, nk))
    out = ops.gathered_attention(q, k, v, idx, 8, 16, masks.causal())
    ref = ops.attention(q, k, v, mask=masks.causal(), implementation="reference")
    harness.assert_close(out, ref, 2e-5, "all blocks")


def test_gathered_empty_rows_are_zero():
    q, k, v = GQA.qkv(jax.random.key(7))
    idx = jnp.full((GQA.B, GQA.K, 5, 2), -1)
    out, lse = ops.gathered_attention(q, k, v, idx, 8, 16, return_lse=True)
    assert not np.asarray(out).any() and np.isneginf(np.asarray(lse)).all()


def test_gathered_errors():
    q, k, v = GQA.qkv(jax.random.key(0))
    idx = jnp.zeros((GQA.B, GQA.K, 5, 2), jnp.int32)
    with pytest.raises(ValueError, match="q_blocks"):
        ops.gathered_attention(q, k, v, idx, 16, 16)
    with pytest.raises(ValueError, match="heads"):
        ops.gathered_attention(q, k, v, jnp.zeros((GQA.B, 3, 5, 2), jnp.int32), 8, 16)
    with pytest.raises(TypeError, match="integer"):
        ops.gathered_attention(q, k, v, idx.astype(jnp.float32), 8, 16)
    with pytest.raises(ValueError, match="key_bias"):
        ops.gathered_attention(q, k, v, idx, 8, 16, key_bias=jnp.zeros((GQA.B, 3, GQA.S)))
