r"""Neural attention: scores from an MLP of each (query, key) pair ("Neural Attention: A Novel
Mechanism for Enhanced Expressive Power in Transformer Models", DiGiugno & Mahmood, 2025).

.. math::

    e_{ij} = w_3^\top \mathrm{ReLU}\big(W_2\, \mathrm{ReLU}(W_1 [q'_i; k'_j] + b_1) + b_2\big) + b_3,
    \qquad O = \mathrm{softmax}(e)\, V

with ``q'``, ``k'`` the (small, ``P``-wide) per-head projections of queries and keys. The first
layer splits, ``W_1 [q'; k'] = U q'_i + V k'_j``, so ``U q'_i + b_1`` and ``V k'_j`` are computed
once per token (``O(T M)``) and only the sum, the ReLUs and the remaining layers run per pair. On
the blockwise path (:func:`attnjax.score_mods.pairwise` inside :func:`attnjax.ops.attention`)
that is ``O(t s M)`` memory per tile; the reference builds the dense ``[B, H, T, S, M]``
activations from the concatenated pairs, as the paper writes it. The MLP is shared by the heads.

Letter legend: B batch, T query length, S key length, H query heads, K key/value heads,
P projected q/k width, M hidden width, E value dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attnjax import _checks, score_mods
from attnjax.core import dispatch
from attnjax.core.blocks import BlockSizes
from attnjax.core.dispatch import Implementation
from attnjax.masks import Mask
from attnjax.ops.attention.api import attention

HI = lax.Precision.HIGHEST
PARAMS = ("w1", "b1", "w2", "b2", "w3", "b3")


def init_mlp(key, width: int, hidden: int | None = None) -> dict:
    """Parameters of the score MLP for ``P = width``: ``2P -> M -> M/2 -> 1`` with ``M = hidden``
    (default ``P``, the paper's widths), LeCun-normal weights and zero biases."""
    import jax

    M = hidden or width
    M2 = max(M // 2, 1)
    k1, k2, k3 = jax.random.split(key, 3)
    n = lambda kk, fan_in, shape: jax.random.normal(kk, shape, jnp.float32) / jnp.sqrt(fan_in)
    return {
        "w1": n(k1, 2 * width, (2 * width, M)),
        "b1": jnp.zeros((M,)),
        "w2": n(k2, M, (M, M2)),
        "b2": jnp.zeros((M2,)),
        "w3": n(k3, M2, (M2,)),
        "b3": jnp.zeros(()),
    }


def _check_mlp(mlp, width: int) -> None:
    if not isinstance(mlp, dict) or set(mlp) != set(PARAMS):
        raise ValueError(f"mlp must be a dict with keys {PARAMS} (see neural_attention_mlp); got {mlp!r}")
    w1, b1, w2, b2, w3, b3 = (jnp.shape(mlp[n]) for n in PARAMS)
    M = w1[-1] if len(w1) == 2 else -1
    M2 = w2[-1] if len(w2) == 2 else -1
    if w1 != (2 * width, M) or b1 != (M,) or w2 != (M, M2) or b2 != (M2,) or w3 != (M2,) or b3 != ():
        raise ValueError(
            f"mlp shapes must be w1 [2P={2 * width}, M], b1 [M], w2 [M, M2], b2 [M2], w3 [M2], b3 []; got "
            f"w1 {w1}, b1 {b1}, w2 {w2}, b2 {b2}, w3 {w3}, b3 {b3}"
        )


def _head(mlp, pre):
    """The MLP after the (split) first layer: ``pre`` ``[..., M]`` pre-activations -> ``[...]``."""
    h = jnp.maximum(pre, 0.0)
    h = jnp.maximum(
        jnp.einsum("...m,mn->...n", h, mlp["w2"].astype(jnp.float32), precision=HI)
        + mlp["b2"].astype(jnp.float32),
        0.0,
    )
    return jnp.einsum("...n,n->...", h, mlp["w3"].astype(jnp.float32), precision=HI) + mlp["b3"].astype(
        jnp.float32
    )


def _tile_scores(mlp, qu, kv):
    """The pairwise score function of the blockwise path: ``qu [..., t, 1, M]``, ``kv [..., 1, s, M]``."""
    return _head(mlp, qu + kv)


def neural_scores(
    q: Float[Array, "B T H P"], k: Float[Array, "B S K P"], mlp: dict
) -> Float[Array, "B H T S"]:
    """The dense score matrix ``e_ij = MLP([q'_i; k'_j])`` (float32; the reference's)."""
    f32 = lambda x: x.astype(jnp.float32)
    H, K = q.shape[2], k.shape[2]
    kr = jnp.repeat(f32(k), H // K, axis=2)
    T, S = q.shape[1], k.shape[1]
    qq = jnp.broadcast_to(f32(q).transpose(0, 2, 1, 3)[:, :, :, None], (q.shape[0], H, T, S, q.shape[3]))
    kk = jnp.broadcast_to(kr.transpose(0, 2, 1, 3)[:, :, None], qq.shape)
    pair = jnp.concatenate([qq, kk], -1)  # [B, H, T, S, 2P]
    pre = jnp.einsum("bhtsp,pm->bhtsm", pair, f32(mlp["w1"]), precision=HI) + f32(mlp["b1"])
    return _head(mlp, pre)


def neural_attention(
    q: Float[Array, "B T H P"],
    k: Float[Array, "B S K P"],
    v: Float[Array, "B S K E"],
    mlp: dict,
    *,
    mask: Mask | None = None,
    implementation: Implementation = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T H E"]:
    r"""Softmax attention with MLP scores (see the module docstring).

    Args:
      q: projected queries ``q'`` ``[B, T, H, P]``.
      k: projected keys ``k'`` ``[B, S, K, P]`` (``K`` divides ``H``).
      v: values ``[B, S, K, E]``.
      mlp: ``{"w1": [2P, M], "b1": [M], "w2": [M, M2], "b2": [M2], "w3": [M2], "b3": []}``
        (:func:`init_mlp`), shared by the heads; every entry gets gradients.
      mask: an :mod:`attnjax.masks` mask (bottom-right aligned).
      implementation: ``"reference"`` (dense ``[B, H, T, S, M]`` activations), ``"xla"`` (the MLP
        per tile inside the blockwise attention), ``None`` (xla) or a sequence.

    >>> import jax
    >>> from attnjax import ops
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 9, 2, 4))
    >>> mlp = ops.neural_attention_mlp(jax.random.key(1), 4)
    >>> out = ops.neural_attention(q, k, v, mlp)
    >>> ref = ops.neural_attention(q, k, v, mlp, implementation="reference")
    >>> out.shape, bool(abs(out - ref).max() < 1e-4)
    ((1, 9, 2, 4), True)
    """
    B, T, S, H, K, P, _ = _checks.check_qkv(q, k, v)
    _check_mlp(mlp, P)
    zq, zk = jnp.zeros((B, T, H, 1), q.dtype), jnp.zeros((B, S, K, 1), q.dtype)

    def reference():
        return attention(zq, zk, v, mask=mask, bias=neural_scores(q, k, mlp), implementation="reference")

    def blockwise():
        f32 = lambda x: x.astype(jnp.float32)
        w1 = f32(mlp["w1"])
        qu = jnp.einsum("bthp,pm->bthm", f32(q), w1[:P], precision=HI) + f32(mlp["b1"])
        kv = jnp.einsum("bshp,pm->bshm", f32(k), w1[P:], precision=HI)
        mod = score_mods.pairwise(_tile_scores, qu, kv, mlp, replace=True)
        return attention(zq, zk, v, mask=mask, score_mod=mod, implementation="xla", block_sizes=block_sizes)

    return dispatch.run("neural_attention", {"reference": reference, "xla": blockwise}, implementation)
