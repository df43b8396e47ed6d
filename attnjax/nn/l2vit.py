"""The blocks of L2ViT ("The Linear Attention Resurrection in Vision Transformer", Zheng, 2024):
enhanced linear global attention alternating with local window attention.

Letter legend: B batch, (h, w) grid, H heads, D head dim, C features.
"""

from __future__ import annotations

import jax
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, ops
from attnjax.nn.layers import Mlp, head_projections
from attnjax.nn.maxvit import MultiAxisAttention
from attnjax.nn.sharding import depthwise_conv, layer_norm


class LocalConcentration(nnx.Module):
    r"""L2ViT's local concentration module (LCM): ``DWConv(norm(gelu(DWConv(x))))`` on the grid,
    two depthwise ``kernel x kernel`` convolutions that re-focus the dispersed linear-attention
    output on each token's neighbourhood. (The paper normalizes with BatchNorm; LayerNorm here
    keeps the module free of batch statistics.)"""

    def __init__(self, features: int, *, kernel: int = 7, axis: str | None = "heads", dtype=None, rngs: nnx.Rngs):
        C = _checks.positive_int("features", features)
        kk = (_checks.positive_int("kernel", kernel),) * 2
        # ``axis``: the logical axis of the C features (heads x head_dim flattened, as in L2ViT)
        conv = lambda: depthwise_conv(C, kk, axis, dtype=dtype, rngs=rngs)
        self.conv1, self.conv2 = conv(), conv()
        self.norm = layer_norm(C, axis, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        return self.conv2(self.norm(jax.nn.gelu(self.conv1(x))))


class LinearGlobalAttention(nnx.Module):
    r"""L2ViT's enhanced linear attention over all ``h w`` tokens, ``O(h w D^2)``.

    .. math::

        A = \frac{\mathrm{ReLU}(Q)\,\big(\mathrm{ReLU}(K)^\top V\big)}{\mathrm{ReLU}(Q)\,\sum_j \mathrm{ReLU}(K_j)},
        \qquad y = \big(A + \mathrm{LCM}(A)\big) W_O

    ``A`` is :func:`attnjax.ops.linear_attention` with ``feature_map="relu"`` (non-causal,
    standard normalization); :class:`LocalConcentration` acts on ``A`` laid out on the grid.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.LinearGlobalAttention(2, 16, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 6, 6, 16))).shape
    (1, 6, 6, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        qkv_features: int | None = None,
        lcm_kernel: int = 7,
        use_bias: bool = True,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, qkv = _checks.head_features(num_heads, in_features, qkv_features)
        self.num_heads, self.head_dim, self.in_features = H, qkv // H, C
        self.implementation = implementation
        self.query, self.key, self.value, self.out = head_projections(
            C, H, qkv // H, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.lcm = LocalConcentration(qkv, kernel=lcm_kernel, dtype=dtype, rngs=rngs)

    def attend(self, q: Array, k: Array, v: Array) -> Array:
        """``A + LCM(A)`` from projected ``[B, h, w, H, D]`` tensors."""
        B, h, w, H, D = q.shape
        flat = lambda x: x.reshape(B, h * w, H, D)
        a = ops.linear_attention(flat(q), flat(k), flat(v), feature_map="relu", normalize="standard",
                                 implementation=self.implementation)
        a = a.reshape(B, h, w, H * D)
        return (a + self.lcm(a)).reshape(B, h, w, H, D)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        if x.ndim != 4 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [batch, height, width, C={self.in_features}]; got {x.shape}")
        return self.out(self.attend(self.query(x), self.key(x), self.value(x)))


class L2ViTBlock(nnx.Module):
    r"""One L2ViT block: a conditional positional encoding (depthwise 3x3, residual), then a
    pre-norm attention and an MLP, each residual:

    .. math::

        x \leftarrow x + \mathrm{DWConv}_{3\times3}(x),\quad
        x \leftarrow x + \mathrm{Attn}(\mathrm{LN}(x)),\quad x \leftarrow x + \mathrm{MLP}(\mathrm{LN}(x))

    ``Attn`` is local window attention (``kind="local"``: :class:`MultiAxisAttention` with
    ``window``, :func:`attnjax.ops.block_attention`) or :class:`LinearGlobalAttention`
    (``kind="global"``). L2ViT alternates them: see :class:`L2ViTBlockPair`.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        kind: str,
        window: int | tuple[int, int] = 7,
        mlp_ratio: float = 4.0,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        C = _checks.positive_int("in_features", in_features)
        kw = dict(implementation=implementation, dtype=dtype, rngs=rngs)
        if kind == "local":
            self.attn = MultiAxisAttention(num_heads, C, window=window, **kw)
        elif kind == "global":
            self.attn = LinearGlobalAttention(num_heads, C, **kw)
        else:
            raise ValueError(f"L2ViTBlock kind must be 'local' or 'global'; got {kind!r}")
        self.cpe = depthwise_conv(C, (3, 3), "embed", dtype=dtype, rngs=rngs)
        self.norm1 = layer_norm(C, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(C, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(C, ratio=mlp_ratio, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        x = x + self.cpe(x)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class L2ViTBlockPair(nnx.Module):
    r"""L2ViT's alternation: a local window attention block, then a global linear attention block.

    Cost ``O(h w (p^2 + D^2))`` per pair for windows of ``p x p``: linear in the number of tokens.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.L2ViTBlockPair(2, 16, window=4, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 8, 8, 16))).shape
    (1, 8, 8, 16)
    """

    def __init__(self, num_heads: int, in_features: int, *, window: int | tuple[int, int] = 7,
                 mlp_ratio: float = 4.0, implementation=None, dtype=None, rngs: nnx.Rngs):
        kw = dict(window=window, mlp_ratio=mlp_ratio, implementation=implementation, dtype=dtype, rngs=rngs)
        self.local = L2ViTBlock(num_heads, in_features, kind="local", **kw)
        self.glob = L2ViTBlock(num_heads, in_features, kind="global", **kw)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        return self.glob(self.local(x))
