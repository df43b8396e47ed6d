r"""Normalized attention pooling ("Normalized Attention Without Probability Cage", Richter &
Wattenhofer, 2020; official graph operator OliverRichter/normalized-attention).

Scores ``s_ij = scale q_i . k_j`` (``scale = 1`` by default: no ``1/sqrt(D)``) are standardized
over the keys query ``i`` sees instead of exponentiated and summed:

.. math::

    a_{ij} = g_h \frac{s_{ij} - \mu_i}{\sigma_i} + b_h,\quad
    \mu_i = \tfrac{1}{N_i} \textstyle\sum_j s_{ij},\quad
    \sigma_i^2 = \tfrac{1}{N_i} \sum_j (s_{ij} - \mu_i)^2 + 10^{-16},\quad
    o_i = \textstyle\sum_j a_{ij} v_j

(weights may be negative; ``g = 1``, ``b = 0`` at initialization). The NON variant uses
``a_ij = s_ij / sqrt(N_i)``. Unmasked or causal both are exactly linear:
``sum_j s_ij = q_i . sum_j k_j``, ``sum_j s_ij^2 = (q_i (x) q_i) . sum_j (k_j (x) k_j)`` and
``sum_j s_ij v_j = q_i^T sum_j k_j v_j^T``, so
``o_i = g (q_i^T K^T V - mu_i sum_j v_j) / sigma_i + b sum_j v_j`` costs ``O(T D (D + E))``
through :func:`attnjax.ops.linear_attention` (prefix sums, i.e. chunked lightning, when causal) and
:func:`square_sums` (``q_i^T (sum_j k_j k_j^T) q_i``, chunked when causal).
The reference is :func:`attnjax.ops.attention` with :func:`attnjax.normalizers.standardize`.
The linear form takes the variance as ``E[s^2] - mu^2`` (clipped at 0), which loses precision
when a row's scores are nearly constant relative to their mean (a row with a single key, the
first causal one, is exact: its weight is ``b``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import masks, normalizers
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention
from attnjax.ops.kernelized.common import HI, prepare
from attnjax.ops.linear.api import linear_attention

VARIANTS = ("nap", "non")


def square_sums(q, k, is_causal: bool, chunk: int = 64):
    """``sum_j (q_i . k_j)^2`` ``[B, T, H]`` over the keys each query sees, without the
    ``D (D + 1) / 2``-wide features: ``q_i^T (sum_j k_j k_j^T) q_i``. Causal, by chunks of
    ``chunk``: the squared scores inside a chunk written out (``O(T chunk D)``) plus the
    earlier chunks' ``sum k k^T`` (an exclusive prefix over chunks, ``O(T D^2)``)."""
    B, T, H, D = q.shape
    if not is_causal:
        kk = jnp.einsum("bshd,bshe->bhde", k, k, precision=HI)
        return jnp.einsum("bthd,bhde,bthe->bth", q, kk, q, precision=HI)
    c = min(chunk, T)
    n = -(-T // c)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, n * c - T), (0, 0), (0, 0))).reshape(B, n, c, H, D)
    qc, kc = pad(q), pad(k)
    s = jnp.einsum("bnihd,bnjhd->bnhij", qc, kc, precision=HI)
    intra = jnp.where(jnp.tril(jnp.ones((c, c), bool)), s * s, 0.0).sum(-1)  # [B, n, H, c]
    kk = jnp.einsum("bnjhd,bnjhe->bnhde", kc, kc, precision=HI)
    before = jnp.cumsum(kk, axis=1) - kk  # the chunks before each one
    inter = jnp.einsum("bnihd,bnhde,bnihe->bnhi", qc, before, qc, precision=HI)
    return (intra + inter).transpose(0, 1, 3, 2).reshape(B, n * c, H)[:, :T]


def _per_head(x, H):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 0:
        return x
    if x.shape != (H,):
        raise ValueError(f"gain and shift must be scalars or per head [heads={H}]; got shape {x.shape}")
    return x[:, None]  # broadcasts against [B, T, H, E]


def nap_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    *,
    gain: float | Float[Array, "H"] = 1.0,
    shift: float | Float[Array, "H"] = 0.0,
    variant: str = "nap",
    is_causal: bool = False,
    scale: float = 1.0,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    r"""Normalized attention pooling (see the module docstring).

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, K, D]``, ``[B, S, K, E]`` (``K`` divides ``H``).
      gain, shift: ``g``, ``b`` (scalars or per head ``[H]``; they get gradients). NAP only.
      variant: ``"nap"`` (standardized rows) or ``"non"`` (``s_ij / sqrt(N_i)``).
      is_causal: query ``i`` sees keys ``j <= i`` (``S == T``).
      scale: score scale (the paper's operator: 1).
      implementation: ``"reference"`` (:func:`attnjax.ops.attention`, dense), ``"xla"`` (linear),
        ``None`` or a sequence.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 9, 2, 4))
    >>> out = ops.nap_attention(q, k, v, is_causal=True)
    >>> ref = ops.nap_attention(q, k, v, is_causal=True, implementation="reference")
    >>> bool(jnp.abs(out - ref).max() < 1e-3)
    True
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    q32, k32, v32 = prepare(q, k, v, is_causal)
    H, T, S = q.shape[2], q.shape[1], k.shape[1]
    g, b = _per_head(gain, H), _per_head(shift, H)
    count = (jnp.arange(1, T + 1, dtype=jnp.float32) if is_causal else jnp.full((T,), float(S)))[
        None, :, None, None
    ]
    mask = masks.causal() if is_causal else None

    def reference():
        if variant == "non":
            out = attention(
                q32, k32, v32, mask=mask, normalizer="identity", scale=scale, implementation="reference"
            )
            return out / jnp.sqrt(count)
        norm = normalizers.standardize(jnp.asarray(gain, jnp.float32), jnp.asarray(shift, jnp.float32))
        return attention(q32, k32, v32, mask=mask, normalizer=norm, scale=scale, implementation="reference")

    def linear():
        lin = lambda a, c, x: linear_attention(
            a, c, x, feature_map="identity", is_causal=is_causal, normalize="none", implementation="xla"
        )
        ones = jnp.ones(v32.shape[:-1] + (1,), jnp.float32)
        both = lin(q32, k32, jnp.concatenate([v32, ones], -1)) * scale
        num, ssum = both[..., :-1], both[..., -1:]  # sum_j s_ij v_j, sum_j s_ij
        if variant == "non":
            return num / jnp.sqrt(count)
        ssq = square_sums(q32, k32, is_causal)[..., None] * scale**2
        vsum = jnp.cumsum(v32, 1) if is_causal else jnp.broadcast_to(v32.sum(1, keepdims=True), num.shape)
        mu = ssum / count
        var = jnp.maximum(ssq / count - mu * mu, 0.0) + 1e-16
        # A row with one key has s - mu = 0 exactly (weight b); E[s^2] - mu^2 would turn rounding
        # noise into O(1) weights there, so it is set, with a gradient-safe variance.
        single = count == 1
        out = g * (num - mu * vsum) / jnp.sqrt(jnp.where(single, 1.0, var)) + b * vsum
        return jnp.where(single, b * vsum, out)

    return dispatch.run("nap_attention", {"reference": reference, "xla": linear}, implementation).astype(
        q.dtype
    )
