r"""LightNet's additive linear recurrence ("You Only Scan Once: Efficient Multi-dimension Sequential
Modeling with LightNet", Qin et al., 2024).

The multiplicative recurrence ``s_t = lambda_t s_{t-1} + k_t v_t^T`` becomes the additive one

.. math::

    s_t = s_{t-1} + e^{k_t} v_t^\top, \quad z_t = z_{t-1} + e^{k_t}, \quad
    o_t = (q_t / z_t)^\top s_t,

with ``/`` per key channel: keys are softmax-normalized per channel over the visible sequence,
which equals a data-dependent per-channel decay ``lambda_t = z_{t-1} / z_t`` of the normalized
state. Non-causal, ``o_i = q_i^T \sum_j \mathrm{softmax}_{seq}(k)_j v_j^T`` does not depend on the
order of the tokens (so one scan serves 2-D/3-D inputs). ``q`` and ``k`` are used as given:
apply the paper's activations and positional encodings (MD-TPE, MD-LRPE) before calling.

The causal form is :func:`attnjax.ops.linear_attention` of ``(q / z, exp(k - m), v)`` (chunked
lightning) with ``z`` the prefix sums of ``exp(k - m)``; the shift ``m`` (the per-channel maximum
over the sequence, without gradient) cancels exactly and only keeps ``exp`` finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.kernelized.common import HI, prepare, visible
from attnjax.ops.linear.api import linear_attention


def lightnet_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    *,
    is_causal: bool = True,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    r"""LightNet's additive recurrence (see the module docstring).

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, K, D]``, ``[B, S, K, E]`` (``K`` divides ``H``).
      is_causal: the recurrence (``S == T``); ``False`` is the order-free global form.
      implementation: ``"reference"`` (dense weights ``sum_d q_id e^{k_jd} / z_id``), ``"xla"``
        (linear attention; causal = chunked lightning), ``None`` or a sequence.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 10, 2, 4))
    >>> out = ops.lightnet_attention(q, k, v)
    >>> ref = ops.lightnet_attention(q, k, v, implementation="reference")
    >>> bool(jnp.abs(out - ref).max() < 1e-4)
    True
    """
    q32, k32, v32 = prepare(q, k, v, is_causal)
    m = jax.lax.stop_gradient(k32.max(1, keepdims=True))
    ek = jnp.exp(k32 - m)  # [B, S, H, D]

    def reference():
        T, S = q32.shape[1], k32.shape[1]
        vis = visible(T, S, is_causal)  # [T, S]
        z = jnp.einsum("ts,bshd->bthd", vis.astype(jnp.float32), ek, precision=HI)
        w = jnp.einsum("bthd,bshd->bhts", q32 / z, ek, precision=HI) * vis
        return jnp.einsum("bhts,bshe->bthe", w, v32, precision=HI)

    def linear():
        z = jnp.cumsum(ek, 1) if is_causal else ek.sum(1, keepdims=True)
        return linear_attention(
            q32 / z,
            ek,
            v32,
            feature_map="identity",
            is_causal=is_causal,
            normalize="none",
            implementation="xla",
        )

    return dispatch.run("lightnet_attention", {"reference": reference, "xla": linear}, implementation).astype(
        q.dtype
    )
