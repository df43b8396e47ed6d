"""The ``cudnn`` implementation of :func:`attnjax.ops.attention`: NVIDIA's fused flash attention
through ``jax.nn.dot_product_attention(implementation="cudnn")``, for what it serves.

cuDNN computes plain softmax attention in bf16/f16 with a causal or sliding-window mask and
grouped-query heads. Everything else (sigmoid, document and arbitrary masks, score mods, dropout,
a dense bias, float32, ``return_lse``, ``T != S`` with a causal mask, head dims over 128)
declines with ``NotImplementedError`` at trace time, so dispatch moves on to Pallas, then xla.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core import platform
from attnjax.core.tiling import Problem
from attnjax.masks import Causal, SlidingWindow
from attnjax.masks.base import And
from attnjax.normalizers import Softmax


def jax_nn_arguments(problem: Problem, dtype, bias, return_lse: bool) -> dict:
    """The ``jax.nn.dot_product_attention`` keywords that compute ``problem``, or
    NotImplementedError saying what cuDNN cannot serve. (jax.nn aligns its masks top-left: a
    bottom-right mask, the library's default, is passed on only for ``T == S``, where they agree.)"""
    d = problem.dims

    def decline(why):
        raise NotImplementedError(f"cuDNN attention does not serve {why}")

    if not isinstance(problem.normalizer, Softmax):
        decline(f"the {type(problem.normalizer).__name__} normalizer")
    if problem.score_mod is not None or problem.dropout is not None or problem.shard is not None:
        decline("score mods, dropout or a shard of a larger problem")
    if bias is not None:
        decline("a dense bias (its gradient support varies by cuDNN version)")
    if return_lse:
        decline("return_lse (jax.nn returns no log-sum-exp)")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        decline(f"{jnp.dtype(dtype).name} inputs (bf16 and f16 only)")
    if d.head_dim != d.v_dim or d.head_dim > 128 or d.head_dim % 8:
        decline(f"head dims D={d.head_dim}, E={d.v_dim} (D == E, a multiple of 8, at most 128)")
    mask, window, causal, positional = problem.mask, None, False, ()
    if isinstance(mask, And) and isinstance(mask.a, Causal) and isinstance(mask.b, SlidingWindow):
        causal, window, positional = True, (mask.b.left, 0), (mask.a, mask.b)
    elif isinstance(mask, Causal):
        causal, positional = True, (mask,)
    elif isinstance(mask, SlidingWindow):
        window, positional = (mask.left, mask.right), (mask,)
    elif mask is not None:
        decline(f"the {type(mask).__name__} mask (causal and sliding windows only)")
    if d.q_len != d.kv_len and not all(m.top_left for m in positional):
        decline("a bottom-right aligned positional mask with T != S (jax.nn aligns them top-left)")
    return dict(scale=problem.scale, is_causal=causal, local_window_size=window)


def attention(problem: Problem, q, k, v, bias, return_lse: bool = False):
    """Returns ``(out [B, T, H, E], lse)`` like the other implementations (``lse`` is zeros: it
    is never requested here, see :func:`jax_nn_arguments`)."""
    if platform.current() != "gpu":
        raise NotImplementedError(f"cuDNN attention needs an NVIDIA GPU; the platform is {platform.current()}")
    kwargs = jax_nn_arguments(problem, q.dtype, bias, return_lse)
    try:
        out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
    except (RuntimeError, ValueError, NotImplementedError) as e:  # raised while tracing: no cuDNN, bad shape
        raise NotImplementedError(f"cuDNN attention declined: {e}") from e
    d = problem.dims
    return out, jnp.zeros((d.batch, d.q_len, d.heads), jnp.float32)
