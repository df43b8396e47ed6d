"""The attention layer of "Multi-Token Attention" (Golovneva et al., 2025).

Letter legend: B batch, T tokens, H heads, D head dim, C features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, masks, ops
from attnjax.masks import Mask
from attnjax.nn.attention import check_module_mask
from attnjax.nn.layers import head_projections
from attnjax.nn.sharding import linear, param, rms_norm


class MultiTokenAttention(nnx.Module):
    r"""Multi-token attention with learned key-query kernels, head mixing and per-head norm.

    .. math::

        O = \mathrm{MTA}(x W_Q, x W_K, x W_V;\ \theta, W), \qquad
        y = \mathrm{GroupNorm}_H(O)\, W_O

    ``MTA`` is :func:`attnjax.ops.multi_token_attention` (key-query convolution ``theta``
    ``[H, c_q, c_k]``, head mixing ``W`` over groups of ``head_group`` heads). Both start as the
    identity, so a fresh layer is plain attention followed by the norm. The per-head norm is an
    RMS norm over each head's ``D`` features (the paper's group normalization, without its
    depth-dependent scaling). Causal by default.

    ``output_gate`` adds the official model's gating after the norm, ``O <- O * sigmoid(O W_g + b_g)``
    per head: ``"1d"`` one gate per head and token (``W_g`` ``[D, 1]``, the official default
    ``gate_1d``), ``"full"`` one per feature (``[D, D]``). ``convention="official"`` stores
    ``kernel`` and ``head_mix`` in the released code's layout (``mta_kernel`` without its
    singleton axis, ``head_kernel``; see :func:`attnjax.ops.multi_token_attention`), initialized
    to its identity, and uses its norm epsilon ``1e-5``, so official weights copy in unchanged.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.MultiTokenAttention(4, 16, kernel=(3, 5), head_group=2, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (2, 10, 16))).shape
    (2, 10, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        kernel: tuple[int, int] = (6, 11),
        head_group: int | None = 2,
        qkv_features: int | None = None,
        mask: Mask | None = masks.causal(),
        output_gate: str | None = None,
        convention: str = "paper",
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, qkv = _checks.head_features(num_heads, in_features, qkv_features)
        cq, ck = (_checks.positive_int(f"kernel[{i}]", c) for i, c in enumerate(kernel))
        self.in_features, self.mask, self.implementation = C, check_module_mask(mask), implementation
        self.convention = _checks.convention(convention)
        official = convention == "official"
        if official and ck % 2 == 0:
            raise ValueError(f"convention='official' pads keys symmetrically, so kernel[1] must be odd; got {ck}")
        D = qkv // H
        self.query, self.key, self.value, self.out = head_projections(
            C, H, D, use_bias=use_bias, dtype=dtype, rngs=rngs)
        # Identity kernel: weight 1 on the query itself (offset 0) and the key itself (centre);
        # the official layout reverses the query axis (its identity is at [h, c_q - 1, c_k // 2]).
        identity = jnp.zeros((H, cq, ck), jnp.float32).at[:, cq - 1 if official else 0, ck // 2].set(1.0)
        self.kernel = param(identity, "heads", None, None)
        if head_group is None:
            self.head_mix = nnx.data(None)
        else:
            ch = _checks.positive_int("head_group", head_group)
            if H % ch:
                raise ValueError(f"head_group={ch} must divide num_heads={H}")
            self.head_mix = param(jnp.tile(jnp.eye(ch, dtype=jnp.float32), (H // ch, 1, 1)), None, None, None)
        self.norm = rms_norm(D, "head_dim", epsilon=1e-5 if official else 1e-6, dtype=dtype, rngs=rngs)
        if output_gate is None:
            self.gate = nnx.data(None)
        elif output_gate in ("1d", "full"):
            self.gate = linear(D, 1 if output_gate == "1d" else D, ("head_dim", None), dtype=dtype, rngs=rngs)
        else:
            raise ValueError(f"output_gate must be None, '1d' or 'full'; got {output_gate!r}")

    def attend(self, q: Array, k: Array, v: Array) -> Array:
        """The op on projected ``[B, T, H, D]`` tensors, with this layer's kernel and mixing."""
        mix = None if self.head_mix is None else self.head_mix[...]
        return ops.multi_token_attention(q, k, v, kernel=self.kernel[...], head_mix=mix, mask=self.mask,
                                         convention=self.convention, implementation=self.implementation)

    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [batch, seq, in_features={self.in_features}]; got {x.shape}")
        o = self.norm(self.attend(self.query(x), self.key(x), self.value(x)))
        if self.gate is not None:
            o = o * jax.nn.sigmoid(self.gate(o)).astype(o.dtype)
        return self.out(o)
