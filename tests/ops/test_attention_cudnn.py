"""``implementation="cudnn"``: what it serves is computed by ``jax.nn.dot_product_attention``
with the keywords :func:`jax_nn_arguments` builds, so their meaning is checked here against the
reference through jax.nn's own xla path (no GPU needed); everything else declines at trace time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks, ops, score_mods
from attnjax.ops.attention.api import make_problem
from attnjax.ops.attention.cudnn import jax_nn_arguments
from kernels_pallas.compile_check import lower_for_gpu, triton_calls
from tests import harness
from tests.harness import Shape

SHAPE = Shape(B=2, T=40, S=40, H=4, K=2, D=16, E=16)
SERVED = {
    "none": None,
    "causal": masks.causal(),
    "window": masks.sliding_window(5, 3),
    "causal_window": masks.causal() & masks.sliding_window(6),
}


def _problem(q, k, v, mask=None, **kw):
    return make_problem(q, k, v, mask, kw.get("score_mod"), kw.get("bias"), kw.get("normalizer", "softmax"),
                        None, None)


@pytest.mark.parametrize("kind", list(SERVED))
def test_jax_nn_arguments_mean_the_same(kind):
    q, k, v = SHAPE.qkv(jax.random.key(0), jnp.bfloat16)
    kwargs = jax_nn_arguments(_problem(q, k, v, SERVED[kind]), q.dtype, None, False)
    got = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
    want = ops.attention(q, k, v, mask=SERVED[kind], implementation="reference")
    harness.assert_close(got, want, harness.tolerance(jnp.bfloat16), kind)


DECLINED = {
    "f32": (dict(), jnp.float32, r"float32 inputs"),
    "sigmoid": (dict(normalizer="sigmoid"), jnp.bfloat16, "Sigmoid normalizer"),
    "document": (dict(mask=masks.document(jnp.zeros((2, 40), jnp.int32))), jnp.bfloat16, "Document mask"),
    "score_mod": (dict(score_mod=score_mods.softcap(20.0)), jnp.bfloat16, "score mods"),
    "bias": (dict(bias=jnp.zeros((1, 1, 40, 40))), jnp.bfloat16, "dense bias"),
}


@pytest.mark.parametrize("case", list(DECLINED))
def test_what_cudnn_cannot_serve_declines(case):
    kw, dtype, match = DECLINED[case]
    q, k, v = SHAPE.qkv(jax.random.key(0), dtype)
    with pytest.raises(NotImplementedError, match=match):
        jax_nn_arguments(_problem(q, k, v, **kw), dtype, kw.get("bias"), False)


def test_cross_attention_serves_top_left_masks_only():
    """jax.nn aligns its masks top-left: a top-left causal or window passes on with T != S, the
    library's bottom-right ones decline."""
    q, k, v = Shape(B=1, T=8, S=20, H=2, K=2, D=16, E=16).qkv(jax.random.key(1), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="T != S"):
        jax_nn_arguments(_problem(q, k, v, masks.causal()), q.dtype, None, False)
    top_left = masks.causal(align="top_left") & masks.sliding_window(3, align="top_left")
    got = jax_nn_arguments(_problem(q, k, v, top_left), q.dtype, None, False)
    assert got["is_causal"] and got["local_window_size"] == (3, 0)
    with pytest.raises(NotImplementedError, match="return_lse"):
        jax_nn_arguments(_problem(q, k, v), q.dtype, None, True)


def test_cudnn_declines_off_gpu_and_dispatch_moves_on():
    q, k, v = SHAPE.qkv(jax.random.key(0), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="needs an NVIDIA GPU"):
        ops.attention(q, k, v, implementation="cudnn")
    # Planning for a GPU on this machine: cuDNN is not loadable here, so the default order's
    # first choice declines while tracing and the Pallas kernels serve the call.
    op = lambda q, k, v: ops.attention(q, k, v, mask=masks.causal())
    assert triton_calls(lower_for_gpu(op, q, k, v)) == 1
