"""The TPU lightning kernels (``kernels_pallas/lightning/tpu.py``) against the token recurrence,
in TPU interpret mode: output, final state, and gradients of q, k, v, the initial state and
log_decay, with and without documents. Only ``implementation="pallas"`` is allowed, so a kernel
that declined would fail the test. Lowering and compiling for v5e: ``test_tpu_lowering.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnjax import ops
from attnjax.core import platform
from tests import harness
from tests.suites import check_lightning_no_memory as check_no_memory
from tests.suites import check_lightning_poison as check_poison

TOL = {"f32": 2e-5, "bf16": 5e-3}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
DECAYS = jnp.array([0.0, -0.01, -0.5, -3.0])  # none, weak, medium, strong


def _check(T, D, E, dtype, segments, H=2, K=2, block_size=None):
    ks = jax.random.split(jax.random.key(0), 5)
    q, k, v = (harness.normal(ks[0], (1, T, H, D)), harness.normal(ks[1], (1, T, K, D)),
               harness.normal(ks[2], (1, T, K, E)))
    s0 = harness.normal(ks[3], (1, H, D, E))
    seg = jnp.sort(jax.random.randint(ks[4], (1, T), 0, 4), axis=1) if segments else None
    op = lambda impl: lambda q, k, v, s0, a: ops.lightning_attention(
        q, k, v, log_decay=a, initial_state=s0, segment_ids=seg, return_final_state=True,
        block_size=block_size if impl == "pallas" else None, implementation=impl)
    loose = {"grad[4]": 2e-2} if dtype == "bf16" else None  # d log_decay sums cancelling terms
    with platform.target("tpu", interpret=True):
        harness.check_vjp(op("pallas"), op("reference"), (q, k, v, s0, DECAYS[:H]), DTYPES[dtype],
                          key=jax.random.key(11), err=harness.rel_rmse, tol=TOL[dtype], loose=loose,
                          what=f"tpu lightning T={T}")


@pytest.mark.parametrize("T, dtype, segments", [
    pytest.param(T, dtype, segments, id=f"{T}-{dtype}-{'documents' if segments else 'plain'}",
                 marks=() if (T, dtype, segments) == (300, "f32", True) else pytest.mark.slow)
    for T in (300, 1) for dtype in DTYPES for segments in (False, True)])
def test_tpu_lightning_matches_reference(T, dtype, segments):
    _check(T, 32, 16, dtype, segments)


@pytest.mark.slow
def test_tpu_lightning_gqa_wide_heads_two_chunk_sizes():
    """GQA (repeated K/V heads), D = E = 128, chunks of 256 over a ragged length."""
    _check(400, 128, 128, "f32", True, H=4, K=2, block_size=256)


def _tpu_op(q, k, v, **kw):
    with platform.target("tpu", interpret=True):
        return ops.lightning_attention(q, k, v, return_final_state=True, implementation="pallas", **kw)


def test_tpu_lightning_confines_poison():
    """A NaN key and an inf value in document 0 (tokens 0-199, chunks of 128) reach only the
    tokens of document 0 after it: the chunk's own rows through the mask, the next chunk's rows
    through the state's carried poison, which the document starting at token 200, inside that
    chunk, must drop (issue 17, as the GPU kernel; tests/ops/test_lightning.py)."""
    check_poison(_tpu_op, lengths=(200, 150, 150), P=50)


def test_tpu_lightning_no_memory():
    """``log_decay = -inf`` (lambda = 0) over three chunks: exact, finite values and gradients."""
    check_no_memory(_tpu_op, T=300)


def test_tpu_lightning_declines_odd_chunks():
    x = jnp.zeros((1, 256, 2, 32))
    with platform.target("tpu", interpret=True), pytest.raises(NotImplementedError, match="multiples of 128"):
        ops.lightning_attention(x, x, x, block_size=64, implementation="pallas")
