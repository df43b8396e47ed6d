"""A selective self-attention layer ("Selective Attention: Enhancing Transformer through
Principled Context Control", Zhang et al., NeurIPS 2024).

Letter legend: B batch, T tokens, H heads, K key/value heads, D head dim, C features.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, masks, ops
from attnjax.masks import Mask
from attnjax.nn.attention import check_module_mask
from attnjax.nn.layers import head_projections
from attnjax.nn.sharding import linear, param


class SelectiveAttention(nnx.Module):
    r"""Multi-head attention with token- and position-dependent query temperatures and
    token-dependent value temperatures (:func:`attnjax.ops.selective_attention`).

    .. math::

        \tau^q_{t,h} = 1 + \tanh(x_t \cdot w^q_h), \quad \nu_{t,k} = 1 + \tanh(x_t \cdot w^v_k), \quad
        y = \mathrm{SSA}(x W_Q, x W_K, x W_V;\ \tau^q, \alpha, \nu)\, W_O

    with a learned per-head position scale ``alpha`` (the factor ``1 + alpha_h log n_i``). The
    temperature maps are ``C -> H`` and ``C -> K`` linear maps (a few hundred parameters, in
    the spirit of the paper's lightweight temperature functions; the exact parameterization is
    ours). ``w^q``, ``w^v`` and ``alpha`` start at zero, so a fresh layer is plain attention.
    Causal by default.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.SelectiveAttention(4, 16, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (2, 10, 16))).shape
    (2, 10, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        num_kv_heads: int | None = None,
        qkv_features: int | None = None,
        mask: Mask | None = masks.causal(),
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H = _checks.positive_int("num_heads", num_heads)
        K = _checks.positive_int("num_kv_heads", num_kv_heads or H)
        C = _checks.positive_int("in_features", in_features)
        qkv = _checks.positive_int("qkv_features", qkv_features or C)
        if qkv % H or H % K:
            raise ValueError(f"need qkv_features={qkv} divisible by num_heads={H}, and num_kv_heads={K} dividing it")
        D = qkv // H
        self.in_features, self.mask, self.implementation = C, check_module_mask(mask), implementation
        self.query, self.key, self.value, self.out = head_projections(
            C, H, D, kv_heads=K, use_bias=use_bias, dtype=dtype, rngs=rngs)
        zeros = nnx.initializers.zeros
        self.query_temperature = linear(C, H, ("embed", "heads"), kernel_init=zeros, dtype=dtype, rngs=rngs)
        self.value_temperature = linear(C, K, ("embed", "kv_heads"), kernel_init=zeros, dtype=dtype, rngs=rngs)
        self.position_scale = param(jnp.zeros((H,), jnp.float32), "heads")

    def temperatures(self, x: Float[Array, "B T C"]):
        """``(tau_q [B, T, H], nu [B, T, K])``."""
        return 1.0 + jnp.tanh(self.query_temperature(x)), 1.0 + jnp.tanh(self.value_temperature(x))

    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [batch, seq, in_features={self.in_features}]; got {x.shape}")
        tq, tv = self.temperatures(x)
        o = ops.selective_attention(
            self.query(x), self.key(x), self.value(x), query_temperature=tq,
            position_scale=self.position_scale[...], value_temperature=tv, mask=self.mask,
            implementation=self.implementation,
        )
        return self.out(o)

