"""The multi-axis attention modules of "MaxViT: Multi-Axis Vision Transformer" (Tu et al., 2022).

Letter legend: B batch, (h, w) grid, H heads, D head dim, C features.
"""

from __future__ import annotations

from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, ops
from attnjax.nn.layers import Mlp, head_projections
from attnjax.nn.sharding import layer_norm


class MultiAxisAttention(nnx.Module):
    r"""Block (``window=``) or grid (``grid=``) attention on a ``[B, h, w, C]`` grid.

    .. math:: y = \mathrm{op}(x W_Q, x W_K, x W_V)\, W_O

    with ``op`` :func:`attnjax.ops.block_attention` (windows of ``window`` adjacent tokens) or
    :func:`attnjax.ops.grid_attention` (a ``grid`` of tokens spread over the image). Exactly one
    of ``window`` and ``grid`` is given. (MaxViT's relative position bias is not included.)

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.MultiAxisAttention(2, 16, grid=4, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 8, 8, 16))).shape
    (1, 8, 8, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        window: int | tuple[int, int] | None = None,
        grid: int | tuple[int, int] | None = None,
        qkv_features: int | None = None,
        use_bias: bool = True,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if (window is None) == (grid is None):
            raise ValueError(f"MultiAxisAttention takes exactly one of window= and grid=; got window={window}, grid={grid}")
        H, C, qkv = _checks.head_features(num_heads, in_features, qkv_features)
        self.window, self.grid, self.in_features = window, grid, C
        self.implementation = implementation
        self.query, self.key, self.value, self.out = head_projections(
            C, H, qkv // H, use_bias=use_bias, dtype=dtype, rngs=rngs)

    def attend(self, q: Array, k: Array, v: Array) -> Array:
        """The op on projected ``[B, h, w, H, D]`` tensors."""
        if self.window is not None:
            return ops.block_attention(q, k, v, window=self.window, implementation=self.implementation)
        return ops.grid_attention(q, k, v, grid=self.grid, implementation=self.implementation)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        if x.ndim != 4 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [batch, height, width, C={self.in_features}]; got {x.shape}")
        return self.out(self.attend(self.query(x), self.key(x), self.value(x)))


class MaxViTBlock(nnx.Module):
    r"""MaxViT's attention pair: block attention then grid attention, each a pre-norm residual
    sub-block followed by an MLP.

    .. math::

        x \leftarrow x + \mathrm{Block}(\mathrm{LN}(x)),\ x \leftarrow x + \mathrm{MLP}(\mathrm{LN}(x)),\
        x \leftarrow x + \mathrm{Grid}(\mathrm{LN}(x)),\ x \leftarrow x + \mathrm{MLP}(\mathrm{LN}(x))

    Local and sparse global mixing in ``O(h w (p^2 + g^2))`` instead of ``O((h w)^2)``. The MBConv
    that precedes them in a MaxViT block is a plain convolution and is left to the model.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.MaxViTBlock(2, 16, window=4, grid=4, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 8, 12, 16))).shape
    (1, 8, 12, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        window: int | tuple[int, int] = 7,
        grid: int | tuple[int, int] = 7,
        mlp_ratio: float = 4.0,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        C = _checks.positive_int("in_features", in_features)
        kw = dict(implementation=implementation, dtype=dtype, rngs=rngs)
        self.block = MultiAxisAttention(num_heads, C, window=window, **kw)
        self.grid = MultiAxisAttention(num_heads, C, grid=grid, **kw)
        norm = lambda: layer_norm(C, dtype=dtype, rngs=rngs)
        self.norms = nnx.List([norm() for _ in range(4)])
        self.mlps = nnx.List([Mlp(C, ratio=mlp_ratio, dtype=dtype, rngs=rngs) for _ in range(2)])

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        for i, attn in enumerate((self.block, self.grid)):
            x = x + attn(self.norms[2 * i](x))
            x = x + self.mlps[i](self.norms[2 * i + 1](x))
        return x
