r"""Feature maps for linear attention: ``phi(Q) (phi(K)^T V)`` instead of ``softmax(Q K^T) V``.

Every feature map is a plain function ``[B, T, H, D] -> [B, T, H, F]`` applied to queries and
keys (some apply a different function to each: see :data:`FEATURE_MAPS`). Used by
:func:`attnjax.ops.linear_attention` (by name or as callables) and usable with
:func:`attnjax.ops.lightning_attention` by applying them to ``q`` and ``k`` first.

Two of the named maps, ``"inline"`` and ``"mala"``, come with their own normalization of the
attention weights (see :func:`attnjax.ops.linear_attention`); their feature functions here are
the ``phi`` those papers use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def identity(x: Float[Array, "B T H D"]) -> Float[Array, "B T H D"]:
    r"""``phi(x) = x`` (plain linear attention; weights may be negative)."""
    return x


def elu1(x: Float[Array, "B T H D"]) -> Float[Array, "B T H D"]:
    r"""``phi(x) = elu(x) + 1`` (positive), from "Transformers are RNNs" (Katharopoulos et al., 2020).

    >>> import jax.numpy as jnp
    >>> elu1(jnp.array([-1e9, 0.0, 2.0])).tolist()
    [0.0, 1.0, 3.0]
    """
    return jax.nn.elu(x) + 1.0


def relu(x: Float[Array, "B T H D"]) -> Float[Array, "B T H D"]:
    r"""``phi(x) = max(x, 0)`` (as in cosFormer's base map, Qin et al., 2022)."""
    return jax.nn.relu(x)


def softmax_features(x: Float[Array, "B T H D"]) -> Float[Array, "B T H D"]:
    r"""``phi(q_t) = softmax(q_t)`` over the feature axis: the query map of "Efficient Attention:
    Attention with Linear Complexities" (Shen et al., 2021)."""
    return jax.nn.softmax(x.astype(jnp.float32), axis=-1).astype(x.dtype)


def softmax_sequence(x: Float[Array, "B T H D"]) -> Float[Array, "B T H D"]:
    r"""``phi(K)_{:, d} = softmax(K_{:, d})`` over the sequence axis, per feature: the key map of
    Efficient Attention. It mixes all positions, so it is not causal."""
    return jax.nn.softmax(x.astype(jnp.float32), axis=1).astype(x.dtype)


def random_projection(
    key: Array, head_dim: int, num_features: int, *, orthogonal: bool = True
) -> Float[Array, "D F"]:
    r"""Gaussian projection ``W`` ``[D, F]`` for :func:`positive_random_features`; with
    ``orthogonal``, blocks of ``D`` columns are orthogonal with chi-distributed norms
    (Performer's orthogonal random features, lower variance)."""
    if not orthogonal:
        return jax.random.normal(key, (head_dim, num_features), jnp.float32)
    blocks = []
    keys = jax.random.split(key, math.ceil(num_features / head_dim) + 1)
    for kk in keys[:-1]:
        q, _ = jnp.linalg.qr(jax.random.normal(kk, (head_dim, head_dim), jnp.float32))
        blocks.append(q)
    w = jnp.concatenate(blocks, axis=1)[:, :num_features]
    norms = jnp.linalg.norm(jax.random.normal(keys[-1], (head_dim, num_features)), axis=0)
    return w * norms[None, :]


def positive_random_features(
    x: Float[Array, "B T H D"], projection: Float[Array, "D F"] | None = None, *,
    key: Array | None = None, num_features: int | None = None,
) -> Float[Array, "B T H F"]:
    r"""Performer's positive random features (FAVOR+, Choromanski et al., 2021):

    .. math:: \phi(x) = \frac{1}{\sqrt{F}} \exp\!\big(W^\top x - \tfrac{\lVert x \rVert^2}{2}\big),
       \qquad \mathbb{E}_W[\phi(q) \cdot \phi(k)] = e^{q \cdot k}.

    Pass a fixed ``projection`` (queries and keys must share it), or a ``key`` to draw one with
    ``num_features`` columns (default ``D``). Callers scale ``x`` (e.g. by ``D^{-1/4}``) to
    approximate ``softmax(q k / sqrt(D))``.
    """
    if projection is None:
        if key is None:
            raise ValueError("positive_random_features needs a projection or a key to draw one")
        projection = random_projection(key, x.shape[-1], num_features or x.shape[-1])
    xf = x.astype(jnp.float32)
    wx = jnp.einsum("bthd,df->bthf", xf, projection, precision=jax.lax.Precision.HIGHEST)
    sq = 0.5 * jnp.sum(xf * xf, axis=-1, keepdims=True)
    return (jnp.exp(wx - sq) / math.sqrt(projection.shape[1])).astype(x.dtype)


def inline(x: Float[Array, "B T H D"]) -> Float[Array, "B T H D"]:
    r"""The kernel of InLine attention ("Bridging the Divide: Reconsidering Softmax and Linear
    Attention", Han et al., 2024): ``phi(x) = x``. InLine replaces the division by
    ``sum_j phi(q).phi(k_j)`` (not injective: ``q`` and ``2q`` give the same weights) with a shift
    that makes the weights sum to one:

    .. math:: w_{ij} = \phi(q_i)\cdot\phi(k_j) - \tfrac{1}{N}\sum_s \phi(q_i)\cdot\phi(k_s) + \tfrac{1}{N}.
    """
    return x


def mala(x: Float[Array, "B T H D"]) -> Float[Array, "B T H D"]:
    r"""The kernel of Magnitude-Aware Linear Attention ("Rectifying Magnitude Neglect in Linear
    Attention", Fan et al., 2025): ``phi = elu + 1``, with weights that keep the query's magnitude
    (standard normalization divides it away) and still sum to one:

    .. math:: w_{ij} = \beta_i\, \phi(q_i)\cdot\phi(k_j) - \gamma_i,\quad
       \beta_i = 1 + \frac{1}{\phi(q_i)\cdot\sum_m \phi(k_m)},\quad
       \gamma_i = \frac{\phi(q_i)\cdot\sum_m \phi(k_m)}{N}.
    """
    return elu1(x)


class FeatureMap(NamedTuple):
    """A named feature map: functions for queries and keys, and its default normalization."""

    query: Callable
    key: Callable
    normalization: str  # "standard", "inline" or "mala"
    causal_ok: bool = True


FEATURE_MAPS: dict[str, FeatureMap] = {
    "identity": FeatureMap(identity, identity, "standard"),
    "elu1": FeatureMap(elu1, elu1, "standard"),
    "relu": FeatureMap(relu, relu, "standard"),
    "softmax": FeatureMap(softmax_features, softmax_sequence, "standard", causal_ok=False),
    "inline": FeatureMap(inline, inline, "inline"),
    "mala": FeatureMap(mala, mala, "mala"),
}
