"""Windowed vision attention modules of zoo part 1: HaloNet, CrossFormer (LSDA with the dynamic
position bias), GC ViT (global query generator and global-query window attention) and YOLOv12's
area attention. Each ``__call__`` is projections, an :mod:`attnjax.ops` call and an output
projection.

Letter legend: B batch, (h, w) grid, H heads, D head dim, C features, G group (window) side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, ops, score_mods
from attnjax.nn.layers import Mlp, head_projections
from attnjax.nn.sharding import axes, depthwise_conv, layer_norm, linear, param


def _check_map(x, C, name="x"):
    if x.ndim != 4 or x.shape[-1] != C:
        raise ValueError(f"{name} must have shape [batch, height, width, C={C}]; got {x.shape}")


def _relative_table(heads: int, window: int, rngs: nnx.Rngs) -> nnx.Param:
    """A Swin-style relative position bias table ``[H, 2 window - 1, 2 window - 1]`` (truncated
    normal, std 0.02), read by :func:`attnjax.score_mods.relative_bias_2d`."""
    n = 2 * window - 1
    return param(0.02 * jax.random.truncated_normal(rngs.params(), -2, 2, (heads, n, n)), "heads", None, None)


class HaloAttention(nnx.Module):
    r"""HaloNet's blocked local self-attention with a halo and factorized content-relative
    logits (:func:`attnjax.ops.halo_attention`) on a ``[B, h, w, C]`` map.

    .. math:: y = W_O\, \mathrm{halo}(x W_Q, x W_K, x W_V;\ r^{row}, r^{col})

    ``r^row, r^col`` are ``[2 (b + 2 halo) - 1, D]``, shared by the heads (timm's ``HaloAttn``).
    ``stride=2`` (HaloNet's downsampling layers) average-pools the output ``2 x 2``.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.HaloAttention(2, 16, block=4, halo=1, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 8, 8, 16))).shape
    (1, 8, 8, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        block: int = 8,
        halo: int = 3,
        qkv_features: int | None = None,
        attend_padding: bool = False,
        stride: int = 1,
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, qkv = _checks.head_features(num_heads, in_features, qkv_features)
        D = qkv // H
        self.block, self.halo, self.in_features = _checks.positive_int("block", block), halo, C
        self.attend_padding, self.implementation = attend_padding, implementation
        if stride not in (1, 2):
            raise ValueError(f"HaloAttention stride must be 1 or 2; got {stride}")
        self.stride = stride
        self.query, self.key, self.value, self.out = head_projections(
            C, H, D, use_bias=use_bias, dtype=dtype, rngs=rngs
        )
        n = block + 2 * _checks.positive_int("halo", halo, allow_zero=True)
        init = lambda: param(D**-0.5 * jax.random.normal(rngs.params(), (2 * n - 1, D)), None, "head_dim")
        self.rel_row, self.rel_col = init(), init()

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h' w' C"]:
        _check_map(x, self.in_features)
        out = ops.halo_attention(
            self.query(x),
            self.key(x),
            self.value(x),
            block=self.block,
            halo=self.halo,
            rel_row=self.rel_row[...],
            rel_col=self.rel_col[...],
            attend_padding=self.attend_padding,
            implementation=self.implementation,
        )
        out = self.out(out)
        if self.stride == 2:  # HaloNet's stride-2 layers: average-pool the output
            out = nnx.avg_pool(out, (2, 2), strides=(2, 2))
        return out


class DynamicPosBias(nnx.Module):
    r"""CrossFormer's dynamic position bias: an MLP from a 2-D offset to one bias per head,
    ``Linear(2 -> p) -> [LN-ReLU-Linear(p -> p)] x 2 -> LN-ReLU-Linear(p -> H)`` (``residual``:
    skips around the two middle layers). :meth:`table` evaluates it on every offset of a
    ``G x G`` group: a ``[H, 2G - 1, 2G - 1]`` table for :func:`attnjax.score_mods.relative_bias_2d`,
    whose size does not depend on the image (the point: variable input sizes)."""

    def __init__(self, pos_dim: int, num_heads: int, *, residual: bool = False, dtype=None, rngs: nnx.Rngs):
        p, H = _checks.positive_int("pos_dim", pos_dim), _checks.positive_int("num_heads", num_heads)
        self.residual = residual
        self.proj = linear(2, p, (None, "mlp"), dtype=dtype, rngs=rngs)
        self.norms = nnx.List([layer_norm(p, "mlp", dtype=dtype, rngs=rngs) for _ in range(3)])
        self.layers = nnx.List([linear(p, p, (None, "mlp"), dtype=dtype, rngs=rngs) for _ in range(2)])
        self.head = linear(p, H, ("mlp", None), dtype=dtype, rngs=rngs)

    def __call__(self, offsets: Float[Array, "... 2"]) -> Float[Array, "... H"]:
        x = self.proj(offsets)
        for norm, layer in zip(self.norms, self.layers):
            y = layer(jax.nn.relu(norm(x)))
            x = x + y if self.residual else y
        return self.head(jax.nn.relu(self.norms[2](x)))

    def table(self, group: int) -> Float[Array, "H A A"]:
        # entry (G-1+dy, G-1+dx) holds the bias of key-minus-query offset (dy, dx); the official
        # code feeds the MLP query-minus-key offsets, hence the minus sign
        d = jnp.arange(1 - group, group, dtype=jnp.float32)
        offsets = -jnp.stack(jnp.meshgrid(d, d, indexing="ij"), -1)  # [2G-1, 2G-1, 2]
        return jnp.moveaxis(self(offsets), -1, 0)


class CrossFormerAttention(nnx.Module):
    r"""CrossFormer's long/short distance attention with the dynamic position bias.

    ``kind="sda"``: attention inside ``G x G`` windows (:func:`attnjax.ops.block_attention`);
    ``kind="lda"``: among the ``G x G`` tokens spaced ``h / G`` apart
    (:func:`attnjax.ops.grid_attention`). Logits get ``DPB(offset)[h]`` with group-local offsets
    (:class:`DynamicPosBias` evaluated each call; gradients reach the MLP through the table).
    The official ``pos_dim`` is ``C / 16`` (``DynamicPosBias(dim // 4)`` then ``dim // 4``).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.CrossFormerAttention(2, 16, group=4, kind="lda", rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 8, 12, 16))).shape
    (1, 8, 12, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        group: int = 7,
        kind: str = "sda",
        pos_dim: int | None = None,
        residual: bool = False,
        use_bias: bool = True,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if kind not in ("sda", "lda"):
            raise ValueError(f"CrossFormerAttention kind must be 'sda' or 'lda'; got {kind!r}")
        H, C, qkv = _checks.head_features(num_heads, in_features)
        self.group, self.kind, self.in_features = _checks.positive_int("group", group), kind, C
        self.implementation = implementation
        self.query, self.key, self.value, self.out = head_projections(
            C, H, qkv // H, use_bias=use_bias, dtype=dtype, rngs=rngs
        )
        self.pos = DynamicPosBias(pos_dim or max(C // 16, 1), H, residual=residual, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        _check_map(x, self.in_features)
        mod = score_mods.relative_bias_2d(self.pos.table(self.group), self.group)
        op = ops.block_attention if self.kind == "sda" else ops.grid_attention
        size = {"window" if self.kind == "sda" else "grid": self.group}
        out = op(
            self.query(x),
            self.key(x),
            self.value(x),
            score_mod=mod,
            implementation=self.implementation,
            **size,
        )
        return self.out(out)


class SqueezeExcite(nnx.Module):
    """``x * sigmoid(W_2 gelu(W_1 mean_{h,w} x))`` (no biases, hidden ``C * ratio``), GC ViT's SE."""

    def __init__(self, features: int, *, ratio: float = 0.25, dtype=None, rngs: nnx.Rngs):
        hidden = max(int(features * ratio), 1)
        self.fc1 = linear(features, hidden, ("embed", "mlp"), use_bias=False, dtype=dtype, rngs=rngs)
        self.fc2 = linear(hidden, features, ("mlp", "embed"), use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        s = self.fc2(jax.nn.gelu(self.fc1(jnp.mean(x, (1, 2), keepdims=True)), approximate=False))
        return x * jax.nn.sigmoid(s)


class GCViTGlobalQuery(nnx.Module):
    r"""GC ViT's global query generator: ``levels`` times ``x <- MaxPool_{3x3/2}(x + Conv_{1x1}(SE(
    GELU(DWConv_{3x3}(x)))))`` (FeatExtract), shrinking the map by ``2^levels`` to the window
    size, then split into heads: ``[B, p, p, H, C / H]`` queries with no projection."""

    def __init__(self, in_features: int, num_heads: int, *, levels: int, dtype=None, rngs: nnx.Rngs):
        C = _checks.positive_int("in_features", in_features)
        self.num_heads = _checks.positive_int("num_heads", num_heads)
        self.dw = nnx.List(
            [
                depthwise_conv(C, (3, 3), "embed", use_bias=False, dtype=dtype, rngs=rngs)
                for _ in range(levels)
            ]
        )
        self.se = nnx.List([SqueezeExcite(C, dtype=dtype, rngs=rngs) for _ in range(levels)])
        self.pw = nnx.List(
            [
                nnx.Conv(
                    C,
                    C,
                    (1, 1),
                    use_bias=False,
                    kernel_metadata=axes(None, None, "embed", None),
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(levels)
            ]
        )

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B p p H D"]:
        for dw, se, pw in zip(self.dw, self.se, self.pw):
            x = x + pw(se(jax.nn.gelu(dw(x), approximate=False)))
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        B, p, q, C = x.shape
        return x.reshape(B, p, q, self.num_heads, C // self.num_heads)


class GlobalWindowAttention(nnx.Module):
    r"""GC ViT's global-query window attention: every ``window`` window attends from the stage's
    global queries (:class:`GCViTGlobalQuery`) to its own keys and values, with a Swin relative
    position bias (:func:`attnjax.ops.window_cross_attention`).

    .. math:: O_w = \mathrm{softmax}(q_g K_w^\top / \sqrt{d} + B_{rel})\, V_w,\quad K, V = x W_{K}, x W_{V}

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.GlobalWindowAttention(2, 16, window=4, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (1, 8, 8, 16))
    >>> m(x, x[:, :4, :4].reshape(1, 4, 4, 2, 8)).shape
    (1, 8, 8, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        window: int = 7,
        use_bias: bool = True,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, _ = _checks.head_features(num_heads, in_features)
        self.window, self.in_features, self.implementation = (
            _checks.positive_int("window", window),
            C,
            implementation,
        )
        _, self.key, self.value, self.out = head_projections(
            C, H, C // H, use_bias=use_bias, dtype=dtype, rngs=rngs
        )
        self.rel_table = _relative_table(H, window, rngs)

    def __call__(
        self, x: Float[Array, "B h w C"], q_global: Float[Array, "B p p H D"]
    ) -> Float[Array, "B h w C"]:
        _check_map(x, self.in_features)
        mod = score_mods.relative_bias_2d(self.rel_table[...], self.window)
        out = ops.window_cross_attention(
            q_global.astype(x.dtype),
            self.key(x),
            self.value(x),
            window=self.window,
            score_mod=mod,
            implementation=self.implementation,
        )
        return self.out(out)


class AreaAttention(nnx.Module):
    r"""YOLOv12's area attention on a ``[B, h, w, C]`` map: multi-head attention inside ``area``
    horizontal stripes (:func:`attnjax.ops.area_attention` on the row-major tokens), plus a
    positional term, a depthwise ``pe_kernel x pe_kernel`` convolution of ``V`` as a map:

    .. math:: y = W_O\big(\mathrm{area}(Q, K, V) + \mathrm{DWConv}(V)\big)

    (The official ``Conv`` wraps the PE and the projections with BatchNorm; here they are plain
    convolutions, keeping the module free of batch statistics.)

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.AreaAttention(2, 16, area=4, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 8, 8, 16))).shape
    (1, 8, 8, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        area: int = 4,
        pe_kernel: int = 5,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, _ = _checks.head_features(num_heads, in_features)
        self.area, self.in_features, self.implementation = (
            _checks.positive_int("area", area),
            C,
            implementation,
        )
        self.query, self.key, self.value, self.out = head_projections(C, H, C // H, dtype=dtype, rngs=rngs)
        k = _checks.positive_int("pe_kernel", pe_kernel)
        self.pe = depthwise_conv(C, (k, k), "embed", dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        _check_map(x, self.in_features)
        B, h, w, C = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)
        flat = lambda t: t.reshape(B, h * w, *t.shape[3:])
        out = ops.area_attention(
            flat(q), flat(k), flat(v), area=self.area, implementation=self.implementation
        )
        pe = self.pe(v.reshape(B, h, w, C)).reshape(v.shape)
        return self.out(out.reshape(v.shape) + pe)


class CrossFormerBlock(nnx.Module):
    """``x + Attn(LN(x))`` then ``x + MLP(LN(x))`` with :class:`CrossFormerAttention`."""

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        group: int = 7,
        kind: str = "sda",
        mlp_ratio: float = 4.0,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        C = _checks.positive_int("in_features", in_features)
        self.attn = CrossFormerAttention(
            num_heads, C, group=group, kind=kind, implementation=implementation, dtype=dtype, rngs=rngs
        )
        self.norm1, self.norm2 = (layer_norm(C, dtype=dtype, rngs=rngs) for _ in range(2))
        self.mlp = Mlp(C, ratio=mlp_ratio, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VSAWindowAttention(nnx.Module):
    r"""VSA's varied-size window attention on a ``[B, h, w, C]`` map: per window and head a
    regressor ``Linear(LeakyReLU(AvgPool_{p}(x)))`` (zero-initialized, so training starts from
    window attention) predicts scales and offsets ``(x, y)``; keys and values are sampled from
    the scaled, shifted windows (:func:`attnjax.ops.sampled_window_attention`), with a Swin
    relative position bias.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.VSAWindowAttention(2, 16, window=4, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 8, 8, 16))).shape
    (1, 8, 8, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        window: int = 7,
        use_bias: bool = True,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, _ = _checks.head_features(num_heads, in_features)
        self.window, self.in_features, self.implementation = (
            _checks.positive_int("window", window),
            C,
            implementation,
        )
        self.query, self.key, self.value, self.out = head_projections(
            C, H, C // H, use_bias=use_bias, dtype=dtype, rngs=rngs
        )
        zeros = nnx.initializers.zeros
        reg = lambda: nnx.LinearGeneral(
            C,
            (H, 2),
            kernel_init=zeros,
            bias_init=zeros,
            dtype=dtype,
            rngs=rngs,
            kernel_metadata=axes("embed", "heads", None),
            bias_metadata=axes("heads", None),
        )
        self.offsets, self.scales = reg(), reg()
        self.rel_table = _relative_table(H, window, rngs)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        _check_map(x, self.in_features)
        p = self.window
        pooled = jax.nn.leaky_relu(nnx.avg_pool(x, (p, p), strides=(p, p)))  # [B, h/p, w/p, C]
        mod = score_mods.relative_bias_2d(self.rel_table[...], p)
        out = ops.sampled_window_attention(
            self.query(x),
            self.key(x),
            self.value(x),
            self.scales(pooled),
            self.offsets(pooled),
            window=p,
            score_mod=mod,
            implementation=self.implementation,
        )
        return self.out(out)


class VaryingWindowAttention(nnx.Module):
    r"""VWA (VWFormer) on a ``[B, h, w, C]`` map: one branch per context ``ratio``, each
    :func:`attnjax.ops.varying_window_attention` on its own projections (window ``P``, context
    ``R P`` pooled to ``P x P``), the branches' output projections summed (multi-scale context at
    the cost of window attention per branch).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.VaryingWindowAttention(2, 16, window=4, ratios=(1, 3), rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 8, 8, 16))).shape
    (1, 8, 8, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        window: int = 8,
        ratios: tuple[int, ...] = (2, 4),
        padding: str = "replicate",
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, _ = _checks.head_features(num_heads, in_features)
        if not ratios:
            raise ValueError("ratios must name at least one context ratio")
        self.window, self.ratios, self.padding = (
            _checks.positive_int("window", window),
            tuple(ratios),
            padding,
        )
        self.in_features, self.implementation = C, implementation
        self.branches = nnx.List(
            [nnx.List(head_projections(C, H, C // H, dtype=dtype, rngs=rngs)) for _ in ratios]
        )

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        _check_map(x, self.in_features)
        out = 0
        for (q, k, v, o), r in zip(self.branches, self.ratios):
            out = out + o(
                ops.varying_window_attention(
                    q(x),
                    k(x),
                    v(x),
                    window=self.window,
                    ratio=r,
                    padding=self.padding,
                    implementation=self.implementation,
                )
            )
        return out


__all__ = [
    "AreaAttention",
    "CrossFormerAttention",
    "CrossFormerBlock",
    "DynamicPosBias",
    "GCViTGlobalQuery",
    "GlobalWindowAttention",
    "HaloAttention",
    "SqueezeExcite",
    "VSAWindowAttention",
    "VaryingWindowAttention",
]
