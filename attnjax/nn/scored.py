"""Layers whose scores are not (only) ``q . k`` (issue 22): neural attention (MLP scores), RCMHA
(depthwise-convolved projections with Transformer-XL relative logits) and the dual attention of
relational heads beside sensory ones. Each ``__call__`` is projections and one op
(:func:`attnjax.ops.neural_attention`, :func:`attnjax.ops.attention` with
:func:`attnjax.score_mods.relative_logits`, :func:`attnjax.ops.relational_attention`).

Letter legend: B batch, T tokens, H heads, D head dim, C features.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, masks, ops, score_mods
from attnjax.masks import Mask
from attnjax.nn.attention import check_module_mask
from attnjax.nn.layers import head_projections, projection_axes
from attnjax.nn.sharding import param


def _check_x(x, C: int) -> None:
    if x.ndim != 3 or x.shape[-1] != C:
        raise ValueError(f"x must have shape [batch, seq, in_features={C}]; got {x.shape}")


class NeuralAttention(nnx.Module):
    r"""Neural attention (:func:`attnjax.ops.neural_attention`): per head ``q' = q W'_q + b``,
    ``k' = k W'_k + b`` (``D -> P``, the paper's ``P = D / 32``, at least 1), scores from the MLP
    ``2P -> M -> M/2 -> 1`` of each pair, softmax, values, output projection.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.NeuralAttention(2, 16, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 9, 16))).shape
    (1, 9, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        score_dim: int | None = None,
        hidden: int | None = None,
        mask: Mask | None = masks.causal(),
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, qkv = _checks.head_features(num_heads, in_features)
        D = qkv // H
        P = _checks.positive_int("score_dim", score_dim or max(D // 32, 1))
        self.in_features, self.mask, self.implementation = C, check_module_mask(mask), implementation
        self.query, self.key, self.value, self.out = head_projections(
            C, H, D, use_bias=use_bias, dtype=dtype, rngs=rngs
        )
        init = lambda shape, fan_in: jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in)
        self.score_q = param(init((H, D, P), D), "heads", "head_dim", None)
        self.score_k = param(init((H, D, P), D), "heads", "head_dim", None)
        self.score_q_bias = param(jnp.zeros((H, P)), "heads", None)
        self.score_k_bias = param(jnp.zeros((H, P)), "heads", None)
        mlp = ops.neural_attention_mlp(rngs.params(), P, hidden)
        mlp["b3"] = mlp["b3"][None]  # stored [1]: every parameter names its axes, a scalar has none
        self.mlp = nnx.data({n: param(p, *(None,) * p.ndim) for n, p in mlp.items()})

    def mlp_params(self) -> dict:
        """The score MLP's parameters as :func:`attnjax.ops.neural_attention` takes them."""
        mlp = {n: p[...] for n, p in self.mlp.items()}
        return {**mlp, "b3": mlp["b3"][0]}

    def scores_inputs(self, q, k):
        """``(q' [B, T, H, P], k' [B, S, H, P])`` from the projected queries and keys."""
        qp = jnp.einsum("bthd,hdp->bthp", q, self.score_q[...]) + self.score_q_bias[...]
        kp = jnp.einsum("bshd,hdp->bshp", k, self.score_k[...]) + self.score_k_bias[...]
        return qp, kp

    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        _check_x(x, self.in_features)
        qp, kp = self.scores_inputs(self.query(x), self.key(x))
        o = ops.neural_attention(
            qp, kp, self.value(x), self.mlp_params(), mask=self.mask, implementation=self.implementation
        )
        return self.out(o)


def sinusoid(positions: Array, dim: int) -> Array:
    """Transformer-XL's sinusoidal encodings ``[len(positions), dim]`` (sin half, then cos half)."""
    inv = 1.0 / (10000 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions.astype(jnp.float32)[:, None] * inv[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)[:, :dim]


def causal_depthwise(x: Array, kernel: Array) -> Array:
    """``y_t = sum_m kernel[m] x_{t - (n - 1) + m}`` per channel (zero history): a causal depthwise
    convolution along axis 1 of ``x [B, T, ...]`` with ``kernel [n, ...]``."""
    n = kernel.shape[0]
    xp = jnp.pad(x, ((0, 0), (n - 1, 0)) + ((0, 0),) * (x.ndim - 2))
    return sum(kernel[m] * xp[:, m : m + x.shape[1]] for m in range(n))


class RCMHA(nnx.Module):
    r"""Relative convolutional multi-head attention ("RCMHA: Relative Convolutional Multi-Head
    Attention for Natural Language Modelling", Sugiharto et al., 2023; a reading of the abstract).

    The q, k, v projections pass a causal depthwise convolution along the sequence (per channel,
    Primer's MDHA), then Transformer-XL's relative scores

    .. math:: A_{ij} = \mathrm{scale}\,\big[(q_i + u) \cdot k_j + (q_i + v) \cdot W_R\, r_{i-j}\big]

    with sinusoidal ``r``. The content term is :func:`attnjax.ops.attention` of ``q + u``; the
    position term is a per-query table ``(q_i + v) . W_R r_d`` for ``|d| <= max_distance``
    (:func:`attnjax.score_mods.relative_logits`, further offsets share the edge), ``O(T R)``, never
    ``[T, S]``. The convolutions start as the identity (last tap 1) and ``u``, ``v`` at zero
    (``W_R`` is random); ``max_distance`` bounds the table (Transformer-XL's full range is
    ``max_distance = T - 1``).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.RCMHA(2, 16, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 9, 16))).shape
    (1, 9, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        kernel_size: int = 3,
        max_distance: int = 64,
        rel_dim: int | None = None,
        mask: Mask | None = masks.causal(),
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, qkv = _checks.head_features(num_heads, in_features)
        D = qkv // H
        n = _checks.positive_int("kernel_size", kernel_size)
        self.max_distance = _checks.positive_int("max_distance", max_distance)
        self.rel_dim = _checks.positive_int("rel_dim", rel_dim or C)
        self.in_features, self.mask, self.implementation, self.head_dim = (
            C,
            check_module_mask(mask),
            implementation,
            D,
        )
        self.query, self.key, self.value, self.out = head_projections(
            C, H, D, use_bias=use_bias, dtype=dtype, rngs=rngs
        )
        identity = jnp.zeros((n, H, D)).at[-1].set(1.0)
        self.conv_q, self.conv_k, self.conv_v = (param(identity, None, "heads", "head_dim") for _ in range(3))
        self.rel = nnx.LinearGeneral(
            self.rel_dim,
            (H, D),
            use_bias=False,
            dtype=dtype,
            rngs=rngs,
            **projection_axes(None, "heads", "head_dim"),
        )
        self.u = param(jnp.zeros((H, D)), "heads", "head_dim")
        self.v = param(jnp.zeros((H, D)), "heads", "head_dim")

    def project(self, x):
        """``(q, k, v)`` after the projections and their causal depthwise convolutions."""
        conv = lambda y, w: causal_depthwise(y, w[...])
        return (
            conv(self.query(x), self.conv_q),
            conv(self.key(x), self.conv_k),
            conv(self.value(x), self.conv_v),
        )

    def relative_table(self, q):
        """``[B, T, H, 2R + 1]``: ``scale (q_i + v) . W_R r_{-d}`` for offsets ``d = j - i`` in ``[-R, R]``."""
        R = self.max_distance
        r = self.rel(sinusoid(-jnp.arange(-R, R + 1), self.rel_dim))  # [2R + 1, H, D]: distance i - j = -d
        return jnp.einsum("bthd,whd->bthw", q + self.v[...], r) / math.sqrt(self.head_dim)

    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        _check_x(x, self.in_features)
        q, k, v = self.project(x)
        mod = score_mods.relative_logits(self.relative_table(q))
        o = ops.attention(
            q + self.u[...], k, v, mask=self.mask, score_mod=mod, implementation=self.implementation
        )
        return self.out(o)


class DualAttention(nnx.Module):
    r"""Dual attention ("Disentangling and Integrating Relational and Sensory Information in
    Transformer Architectures", Altabaa & Lafferty, 2024): ``num_heads`` ordinary (sensory) heads
    beside ``num_relational_heads`` relational heads (:func:`attnjax.ops.relational_attention`):
    ``RA(x)_i = sum_j alpha_ij (W_r r_ij + W_s s_j)`` with ``d_r = relations`` relation
    projections shared by the heads and learned positional symbols ``s`` (``max_len`` of them).
    The heads' outputs are concatenated and projected.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.DualAttention(2, 2, 16, max_len=12, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 9, 16))).shape
    (1, 9, 16)
    """

    def __init__(
        self,
        num_heads: int,
        num_relational_heads: int,
        in_features: int,
        *,
        max_len: int,
        relations: int = 4,
        rel_dim: int | None = None,
        mask: Mask | None = masks.causal(),
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        Hs = _checks.positive_int("num_heads", num_heads)
        Hr = _checks.positive_int("num_relational_heads", num_relational_heads)
        C = _checks.positive_int("in_features", in_features)
        if C % (Hs + Hr):
            raise ValueError(
                f"in_features={C} must be divisible by num_heads + num_relational_heads={Hs + Hr}"
            )
        D = C // (Hs + Hr)
        L = _checks.positive_int("relations", relations)
        R = _checks.positive_int("rel_dim", rel_dim or D)
        self.in_features, self.mask, self.implementation, self.max_len = (
            C,
            check_module_mask(mask),
            implementation,
            max_len,
        )
        lin = lambda shape, names: nnx.LinearGeneral(
            C, shape, use_bias=use_bias, dtype=dtype, rngs=rngs, **projection_axes("embed", *names)
        )
        self.query, self.key, self.value = (lin((Hs, D), ("heads", "head_dim")) for _ in range(3))
        self.rel_query, self.rel_key = (lin((Hr, D), ("heads", "head_dim")) for _ in range(2))
        self.relation_q, self.relation_k = (lin((L, R), (None, None)) for _ in range(2))
        self.symbols = param(
            jax.random.normal(rngs.params(), (max_len, Hr, D)) * 0.02, None, "heads", "head_dim"
        )
        self.w_rel = param(
            jax.random.normal(rngs.params(), (Hr, L, D)) / math.sqrt(L), "heads", None, "head_dim"
        )
        self.out = nnx.LinearGeneral(
            (Hs + Hr, D),
            C,
            axis=(-2, -1),
            use_bias=use_bias,
            dtype=dtype,
            rngs=rngs,
            **projection_axes("heads", "head_dim", "embed", inputs=2),
        )

    def relational_inputs(self, x):
        """The arguments of :func:`attnjax.ops.relational_attention` for ``x``."""
        B, T, _ = x.shape
        Hr = self.rel_query.kernel.shape[1]
        qr = jnp.broadcast_to(self.relation_q(x)[:, :, None], (B, T, Hr) + self.relation_q.kernel.shape[1:])
        kr = jnp.broadcast_to(self.relation_k(x)[:, :, None], qr.shape)
        sym = jnp.broadcast_to(self.symbols[...][:T][None], (B, T) + self.symbols.shape[1:])
        return self.rel_query(x), self.rel_key(x), qr, kr, sym, self.w_rel[...]

    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        _check_x(x, self.in_features)
        if x.shape[1] > self.max_len:
            raise ValueError(f"x has {x.shape[1]} tokens; the layer has symbols for max_len={self.max_len}")
        sensory = ops.attention(
            self.query(x), self.key(x), self.value(x), mask=self.mask, implementation=self.implementation
        )
        relational = ops.relational_attention(*self.relational_inputs(x), mask=self.mask)
        return self.out(jnp.concatenate([sensory, relational.astype(sensory.dtype)], axis=2))
