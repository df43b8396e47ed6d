"""The Mega layer of "Mega: Moving Average Equipped Gated Attention" (Ma et al., ICLR 2023).

Letter legend: B batch, T length, C features, N EMA expansion, Z shared q/k dim, E value dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, ops
from attnjax.nn.sharding import linear, param


class MegaLayer(nnx.Module):
    r"""Mega: an EMA, single-head gated attention, and reset/update gates.

    .. math::

        X' &= \mathrm{EMA}(X) \quad\text{(multi-dimensional damped, :func:`attnjax.ops.damped_ema`)} \\
        Z &= \mathrm{silu}(X' W_z + b_z), \quad Q = \kappa_q \odot Z + \mu_q, \quad K = \kappa_k \odot Z + \mu_k \\
        V &= \mathrm{silu}(X W_v + b_v), \quad O = \mathrm{softmax}(Q K^\top / \sqrt{Z} + M)\, V
            \quad\text{(:func:`attnjax.ops.mega_attention`)} \\
        \gamma &= \mathrm{silu}(X' W_\gamma + b_\gamma), \quad \varphi = \sigma(X' W_\varphi + b_\varphi) \\
        H &= \mathrm{silu}(X' W_h + (\gamma \odot O) U_h + b_h), \qquad Y = \varphi \odot H + (1 - \varphi) \odot X

    ``gamma`` is the reset gate, ``phi`` the update gate. With ``chunk_size`` the attention is
    Mega-chunk (``O(T c)``; the EMA still spans the whole sequence). ``alpha = sigmoid(a)``,
    ``delta = sigmoid(d)`` keep the EMA stable. Causal by default (language modelling).

    Porting the released Mega's EMA (``MultiHeadEMA``): its parameter names are swapped relative
    to the paper (see :func:`attnjax.ops.damped_ema`, ``convention="official"``), so its
    ``delta -> alpha_logit``, ``alpha -> delta_logit``, ``beta[..., 0] -> beta``,
    ``gamma / sqrt(N) -> eta``; its ``omega`` residual and ``silu`` after the EMA are not part of
    this layer.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.MegaLayer(16, ema_dim=4, qk_dim=8, chunk_size=8, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (2, 20, 16))).shape
    (2, 20, 16)
    """

    def __init__(
        self,
        features: int,
        *,
        ema_dim: int = 16,
        qk_dim: int = 64,
        v_dim: int | None = None,
        chunk_size: int | None = None,
        is_causal: bool = True,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        C = _checks.positive_int("features", features)
        N = _checks.positive_int("ema_dim", ema_dim)
        Z = _checks.positive_int("qk_dim", qk_dim)
        E = _checks.positive_int("v_dim", v_dim or 2 * C)
        if chunk_size is not None:
            _checks.positive_int("chunk_size", chunk_size)
        self.features, self.qk_dim, self.v_dim = C, Z, E
        self.chunk_size, self.is_causal, self.implementation = chunk_size, is_causal, implementation
        normal = lambda std, shape: param(std * jax.random.normal(rngs.params(), shape, jnp.float32), "embed", None)
        self.alpha_logit, self.delta_logit = normal(0.2, (C, N)), normal(0.2, (C, N))
        self.beta, self.eta = normal(0.02, (C, N)), normal(N ** -0.5, (C, N))
        self.value = linear(C, E, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        # One projection of X' for Z, the reset gate, the update gate and the H candidate (its
        # outputs are sliced apart, so only its input axis is sharded).
        self.mix = linear(C, Z + E + 2 * C, ("embed", None), dtype=dtype, rngs=rngs)
        self.h_proj = linear(E, C, ("mlp", "embed"), use_bias=False, dtype=dtype, rngs=rngs)
        self.qk_scale = param(1.0 + 0.02 * jax.random.normal(rngs.params(), (2, Z), jnp.float32), None, None)
        self.qk_offset = param(jnp.zeros((2, Z), jnp.float32), None, None)

    def ema(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        alpha, delta = jax.nn.sigmoid(self.alpha_logit[...]), jax.nn.sigmoid(self.delta_logit[...])
        return ops.damped_ema(x, alpha, delta, self.beta[...], self.eta[...], implementation=self.implementation)

    def projections(self, x: Float[Array, "B T C"]):
        """``(q [B,T,1,Z], k [B,T,1,Z], v [B,T,1,E], reset, update, h_x)`` of the equations."""
        x_ema = self.ema(x)
        Z, E, C = self.qk_dim, self.v_dim, self.features
        mixed = self.mix(x_ema)
        z = jax.nn.silu(mixed[..., :Z])
        reset = jax.nn.silu(mixed[..., Z:Z + E])
        update = jax.nn.sigmoid(mixed[..., Z + E:Z + E + C])
        h_x = mixed[..., Z + E + C:]
        scale, offset = self.qk_scale[...].astype(z.dtype), self.qk_offset[...].astype(z.dtype)
        q, k = z * scale[0] + offset[0], z * scale[1] + offset[1]
        v = jax.nn.silu(self.value(x))
        return q[:, :, None], k[:, :, None], v[:, :, None], reset, update, h_x

    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        if x.ndim != 3 or x.shape[-1] != self.features:
            raise ValueError(f"x must have shape [batch, seq, features={self.features}]; got {x.shape}")
        q, k, v, reset, update, h_x = self.projections(x)
        o = ops.mega_attention(q, k, v, chunk_size=self.chunk_size, is_causal=self.is_causal,
                               implementation=self.implementation)[:, :, 0]
        h = jax.nn.silu(h_x + self.h_proj(reset * o))
        return update * h + (1.0 - update) * x
