r"""FAST / fastmax ("FAST: Factorizable Attention for Speeding up Transformers", Gerami et al.,
2024): a polynomial in place of the exponential, factorized into linear attention.

Per head, queries and keys are centred over their features and scaled by the largest norm over
the sequence, ``q~_i = (q_i - mean_d q_i) / max_i' ||q_i' - mean_d q_i'||`` (the same for ``k``),
so ``|s_ij| <= 1`` for ``s_ij = q~_i . k~_j``; the weights are ``f(s) = 1 + s + s^2 / 2``
(``p = 2``; ``p = 1``: ``1 + s``) and

.. math:: o_i = \sum_j f(s_{ij})\, v_j \Big/ \sum_j f(s_{ij}).

``f > 0`` (``1 + s + s^2/2`` has no real root; ``1 + s >= 0`` for ``|s| <= 1``), and
``f(q~.k~) = phi(q~) . phi(k~)`` with ``phi(x) = [1, x, x (x) x / sqrt 2]`` (the square packed
symmetrically: ``D (D + 1) / 2`` entries), so the op is :func:`attnjax.ops.linear_attention` with
that feature map, ``O(T D^2 E)``.

The max-norm is a statistic of the whole sequence; the causal form uses the running (prefix)
maximum instead, so no token sees the future (each token's features are fixed once it is read).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.kernelized.common import dense_scores, prepare, visible, weighted
from attnjax.ops.linear.api import linear_attention


def fastmax_normalize(x: Float[Array, "B T H D"], *, is_causal: bool = False) -> Float[Array, "B T H D"]:
    """``(x - mean_d x) / max_t ||x_t - mean_d x_t||`` per batch and head (running max when causal)."""
    c = x - x.mean(-1, keepdims=True)
    norm = jnp.sqrt((c * c).sum(-1, keepdims=True))  # [B, T, H, 1]
    top = jax.lax.cummax(norm, axis=1) if is_causal else norm.max(1, keepdims=True)
    return c / jnp.maximum(top, 1e-12)


def fastmax_features(x: Float[Array, "... D"], p: int = 2) -> Float[Array, "... F"]:
    r"""``phi(x) = [1, x, x (x) x / sqrt 2]`` (``p = 2``, symmetric packing: ``x_a^2 / sqrt 2`` on
    the diagonal, ``x_a x_b`` above it) or ``[1, x]`` (``p = 1``), so ``phi(x) . phi(y) = 1 + x.y
    (+ (x.y)^2 / 2)``.

    >>> import jax.numpy as jnp
    >>> x, y = jnp.array([0.3, -0.2, 0.5]), jnp.array([0.1, 0.4, -0.6])
    >>> s = x @ y
    >>> bool(jnp.allclose(fastmax_features(x) @ fastmax_features(y), 1 + s + s * s / 2))
    True
    """
    ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
    if p == 1:
        return jnp.concatenate([ones, x], -1)
    D = x.shape[-1]
    a, b = np.triu_indices(D)
    weight = jnp.asarray(np.where(a == b, 2**-0.5, 1.0), x.dtype)
    return jnp.concatenate([ones, x, x[..., a] * x[..., b] * weight], -1)


def fastmax_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    *,
    p: int = 2,
    is_causal: bool = False,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    r"""Fastmax attention (see the module docstring).

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, K, D]``, ``[B, S, K, E]`` (``K`` divides ``H``),
        normalized here by :func:`fastmax_normalize`.
      p: the polynomial's degree, 1 or 2.
      is_causal: query ``i`` sees keys ``j <= i`` (``S == T``; running max-norm).
      implementation: ``"reference"`` (dense ``f(s)`` weights), ``"xla"`` (factorized), ``None``
        or a sequence.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 10, 2, 4))
    >>> out = ops.fastmax_attention(q, k, v, is_causal=True)
    >>> ref = ops.fastmax_attention(q, k, v, is_causal=True, implementation="reference")
    >>> bool(jnp.abs(out - ref).max() < 1e-4)
    True
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2; got {p!r}")
    q32, k32, v32 = prepare(q, k, v, is_causal)
    qn, kn = fastmax_normalize(q32, is_causal=is_causal), fastmax_normalize(k32, is_causal=is_causal)

    def reference():
        s = dense_scores(qn, kn)
        w = 1.0 + s + (s * s / 2.0 if p == 2 else 0.0)
        w = jnp.where(visible(s.shape[2], s.shape[3], is_causal), w, 0.0)
        return weighted(w / w.sum(-1, keepdims=True), v32)

    def factorized():
        fq, fk = fastmax_features(qn, p), fastmax_features(kn, p)
        return linear_attention(
            fq,
            fk,
            v32,
            feature_map="identity",
            is_causal=is_causal,
            normalize="standard",
            implementation="xla",
        )

    return dispatch.run(
        "fastmax_attention", {"reference": reference, "xla": factorized}, implementation
    ).astype(q.dtype)
