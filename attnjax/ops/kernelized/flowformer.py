r"""Flow attention ("Flowformer: Linearizing Transformers with Conservation Flows", Wu et al., ICML
2022; official code thuml/Flowformer ``Flow_Attention.py``).

With ``phi = sigmoid`` on queries and keys (``n`` queries, ``m`` keys), non-causal:

.. math::

    I_i = \phi(q_i) \cdot \textstyle\sum_j \phi(k_j), \quad O_j = \phi(k_j) \cdot \sum_i \phi(q_i),\\
    \hat I_i = \phi(q_i) \cdot \textstyle\sum_j \phi(k_j) / O_j, \quad
    \hat O_j = \mathrm{clip}\big(\phi(k_j) \cdot \sum_i \phi(q_i) / I_i,\ -1,\ 1\big),\\
    a_i = \sigma(\hat I_i\, n / m), \quad c = m\, \mathrm{softmax}(\hat O), \quad
    o_i = a_i\, \frac{\phi(q_i)}{I_i} \cdot \textstyle\sum_j \phi(k_j)\, (c_j v_j)^\top.

Causal (``Flow_Attention_Causal``): every sum runs over ``j <= i`` (incoming) or ``i <= j``
(outgoing), normalized by the position count ``i + 1``: ``\hat I_i = \phi(q_i) \cdot
\sum_{j<=i} \phi(k_j) (j+1) / O_j / (i+1)``, ``\hat O_j = \mathrm{clip}(\phi(k_j) \cdot
\sum_{i<=j} \phi(q_i) (i+1) / I_i / (j+1))``, ``a_i = \sigma(\hat I_i)`` and ``c_j = (j+1)
e^{\hat O_j} / \sum_{j'<=j} e^{\hat O_{j'}}``.

The per-token scalars are ``O(T D)`` sums (prefix sums when causal); the output is one
:func:`attnjax.ops.linear_attention` (identity features, no normalization; causal = chunked
lightning). The reference writes the ``[T, S]`` matrix ``A = phi(Q) phi(K)^T`` and takes every
sum from it. The official code adds ``eps = 1e-6`` inside its sums; here the denominators
``I``, ``O`` are floored at ``1e-6`` instead (sigmoid features are positive, so this only matters
where they underflow).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.kernelized.common import HI, dense_scores, prepare, visible, weighted
from attnjax.ops.linear.api import linear_attention

EPS = 1e-6


def _floor(x):
    return jnp.maximum(x, EPS)


def _dense(fq, fk, v, is_causal):
    T = fq.shape[1]
    S = fk.shape[1]
    full = dense_scores(fq, fk)  # [B, H, T, S]
    A = jnp.where(visible(T, S, is_causal), full, 0.0)  # flow into query i: keys j <= i
    # flow out of key j: queries i <= j when causal (the official prefix sums over queries)
    A_out = jnp.where(visible(T, S, is_causal).T if is_causal else True, full, 0.0)
    I, O = _floor(A.sum(-1)), _floor(A_out.sum(-2))  # [B, H, T], [B, H, S]
    if is_causal:
        n = jnp.arange(1, T + 1, dtype=jnp.float32)
        I_hat = jnp.einsum("bhts,bhs->bht", A, n / O, precision=HI) / n
        O_hat = jnp.clip(jnp.einsum("bhts,bht->bhs", A_out, n / I, precision=HI) / n, -1.0, 1.0)
        a = jax.nn.sigmoid(I_hat)
        e = jnp.exp(O_hat - jax.lax.stop_gradient(O_hat.max(-1, keepdims=True)))
        c = n * e / jnp.cumsum(e, -1)
    else:
        I_hat = jnp.einsum("bhts,bhs->bht", A, 1.0 / O, precision=HI)
        O_hat = jnp.clip(jnp.einsum("bhts,bht->bhs", A, 1.0 / I, precision=HI), -1.0, 1.0)
        a = jax.nn.sigmoid(I_hat * T / S)
        c = S * jax.nn.softmax(O_hat, -1)
    w = (a / I)[..., None] * A * c[:, :, None, :]
    return weighted(w, v)


def _linear(fq, fk, v, is_causal):
    T = fq.shape[1]
    if is_causal:
        n = jnp.arange(1, T + 1, dtype=jnp.float32)[None, :, None]  # [1, T, 1]
        I = _floor(jnp.einsum("bthd,bthd->bth", fq, jnp.cumsum(fk, 1), precision=HI))
        O = _floor(jnp.einsum("bthd,bthd->bth", fk, jnp.cumsum(fq, 1), precision=HI))
        I_hat = jnp.einsum("bthd,bthd->bth", fq, jnp.cumsum(fk * (n / O)[..., None], 1), precision=HI) / n
        O_hat = jnp.einsum("bthd,bthd->bth", fk, jnp.cumsum(fq * (n / I)[..., None], 1), precision=HI) / n
        O_hat = jnp.clip(O_hat, -1.0, 1.0)
        a = jax.nn.sigmoid(I_hat)
        e = jnp.exp(O_hat - jax.lax.stop_gradient(O_hat.max(1, keepdims=True)))
        c = n * e / jnp.cumsum(e, 1)
    else:
        S = fk.shape[1]
        I = _floor(jnp.einsum("bthd,bhd->bth", fq, fk.sum(1), precision=HI))
        O = _floor(jnp.einsum("bshd,bhd->bsh", fk, fq.sum(1), precision=HI))
        I_hat = jnp.einsum("bthd,bhd->bth", fq, (fk / O[..., None]).sum(1), precision=HI)
        O_hat = jnp.clip(jnp.einsum("bshd,bhd->bsh", fk, (fq / I[..., None]).sum(1), precision=HI), -1.0, 1.0)
        a = jax.nn.sigmoid(I_hat * T / S)
        c = S * jax.nn.softmax(O_hat, 1)
    out = linear_attention(
        fq / I[..., None],
        fk,
        v * c[..., None],
        feature_map="identity",
        is_causal=is_causal,
        normalize="none",
        implementation="xla",
    )
    return out * a[..., None]


def flow_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    *,
    is_causal: bool = False,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    r"""Flowformer's flow attention (see the module docstring), ``O(T D E)``.

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, K, D]``, ``[B, S, K, E]`` (``K`` divides ``H``); the
        sigmoid feature map is applied here.
      is_causal: prefix sums (``S == T``, query ``i`` sees keys ``j <= i``).
      implementation: ``"reference"`` (dense ``[T, S]``), ``"xla"`` (linear), ``None`` or a sequence.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 12, 2, 4))
    >>> out = ops.flow_attention(q, k, v, is_causal=True)
    >>> ref = ops.flow_attention(q, k, v, is_causal=True, implementation="reference")
    >>> out.shape, bool(jnp.abs(out - ref).max() < 1e-4)
    ((1, 12, 2, 4), True)
    """
    q32, k32, v32 = prepare(q, k, v, is_causal)
    fq, fk = jax.nn.sigmoid(q32), jax.nn.sigmoid(k32)
    impls = {
        "reference": lambda: _dense(fq, fk, v32, is_causal),
        "xla": lambda: _linear(fq, fk, v32, is_causal),
    }
    return dispatch.run("flow_attention", impls, implementation).astype(q.dtype)
