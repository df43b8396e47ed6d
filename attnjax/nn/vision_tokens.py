"""Token-level vision attention modules of zoo part 1: DaViT (channel group attention and its
channel / spatial blocks), CrossViT's cross-attention fusion of two branches, TNT's
inner/outer block and Plain DETR's box-to-pixel relative position bias (BoxRPB). Each
``__call__`` is projections, :mod:`attnjax.ops` calls and output projections.

Letter legend: B batch, N tokens, (h, w) grid, H heads, D head dim, C features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, ops, score_mods
from attnjax.nn.layers import Mlp, head_projections
from attnjax.nn.maxvit import MultiAxisAttention
from attnjax.nn.sharding import depthwise_conv, layer_norm, linear


class ChannelGroupAttention(nnx.Module):
    r"""DaViT's channel group attention on ``[B, N, C]`` tokens: per group of ``C_g = C / H``
    channels, ``A_g = softmax(C_g^{-1/2} K_g^\top V_g)`` (``C_g x C_g``) and ``out_g = Q_g A_g^\top``;
    :func:`attnjax.ops.channel_attention` with ``(k, v, q)`` (the official roles), ``O(N C_g C)``.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.ChannelGroupAttention(2, 16, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 10, 16))).shape
    (1, 10, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        use_bias: bool = True,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, _ = _checks.head_features(num_heads, in_features)
        self.num_heads, self.in_features, self.implementation = H, C, implementation
        self.qkv = linear(C, 3 * C, ("embed", "mlp"), use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.proj = linear(C, C, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B N C"]) -> Float[Array, "B N C"]:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [batch, tokens, C={self.in_features}]; got {x.shape}")
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        scale = (self.in_features // self.num_heads) ** -0.5
        out = ops.channel_attention(
            k, v, q, groups=self.num_heads, scale=scale, implementation=self.implementation
        )
        return self.proj(out)


class DaViTBlock(nnx.Module):
    r"""A DaViT block on a ``[B, h, w, C]`` map: conditional position encoding (depthwise 3x3,
    residual) before the attention and before the MLP,

    .. math::

        x \leftarrow x + \mathrm{DW}(x),\ x \leftarrow x + \mathrm{Attn}(\mathrm{LN}(x)),\
        x \leftarrow x + \mathrm{DW}(x),\ x \leftarrow x + \mathrm{MLP}(\mathrm{LN}(x))

    with ``kind="channel"`` (:class:`ChannelGroupAttention` over all ``h w`` tokens, linear in
    them) or ``kind="spatial"`` (window attention, :func:`attnjax.ops.block_attention`). DaViT
    alternates spatial and channel blocks.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.DaViTBlock(2, 16, kind="channel", rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 6, 6, 16))).shape
    (1, 6, 6, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        kind: str = "channel",
        window: int = 7,
        mlp_ratio: float = 4.0,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        C = _checks.positive_int("in_features", in_features)
        kw = dict(implementation=implementation, dtype=dtype, rngs=rngs)
        if kind == "channel":
            self.attn = ChannelGroupAttention(num_heads, C, **kw)
        elif kind == "spatial":
            self.attn = MultiAxisAttention(num_heads, C, window=window, **kw)
        else:
            raise ValueError(f"DaViTBlock kind must be 'channel' or 'spatial'; got {kind!r}")
        self.kind = kind
        self.cpe1, self.cpe2 = (depthwise_conv(C, (3, 3), "embed", dtype=dtype, rngs=rngs) for _ in range(2))
        self.norm1, self.norm2 = (layer_norm(C, dtype=dtype, rngs=rngs) for _ in range(2))
        self.mlp = Mlp(C, ratio=mlp_ratio, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        B, h, w, C = x.shape
        x = x + self.cpe1(x)
        y = self.norm1(x)
        y = self.attn(y.reshape(B, h * w, C)).reshape(x.shape) if self.kind == "channel" else self.attn(y)
        x = x + y
        x = x + self.cpe2(x)
        return x + self.mlp(self.norm2(x))


class _Projector(nnx.Module):
    """``Linear(GELU(LN(x)))``: CrossViT's CLS projection between the branches' widths."""

    def __init__(self, c_in: int, c_out: int, *, dtype=None, rngs: nnx.Rngs):
        self.norm = layer_norm(c_in, dtype=dtype, rngs=rngs)
        self.fc = linear(c_in, c_out, ("embed", "mlp"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc(jax.nn.gelu(self.norm(x), approximate=False))


class CrossAttentionToken(nnx.Module):
    r"""CrossViT's cross-attention block for one branch: the (projected) CLS ``c'`` of the other
    branch queries ``z = [c'; patches]`` (pre-LN), one query over ``N + 1`` keys:

    .. math:: y = c' + W_O\,\mathrm{softmax}\big(W_Q z_0 (W_K z)^\top / \sqrt{d}\big)\, W_V z

    (:func:`attnjax.ops.attention` with ``T = 1``, ``O(N)``). Returns ``[B, 1, C]``."""

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, _ = _checks.head_features(num_heads, in_features)
        self.implementation = implementation
        self.norm = layer_norm(C, dtype=dtype, rngs=rngs)
        self.query, self.key, self.value, self.out = head_projections(
            C, H, C // H, use_bias=use_bias, dtype=dtype, rngs=rngs
        )

    def __call__(self, z: Float[Array, "B N C"]) -> Float[Array, "B 1 C"]:
        n = self.norm(z)
        out = ops.attention(
            self.query(n[:, :1]), self.key(n), self.value(n), implementation=self.implementation
        )
        return z[:, :1] + self.out(out)


class CrossViTFusion(nnx.Module):
    r"""CrossViT's fusion of a small-patch branch (width ``C_s``) and a large-patch branch
    (``C_l``), each ``[B, 1 + N, C]`` with its CLS first: each branch's CLS, projected to the
    other's width (``f``: LN-GELU-Linear), queries the other branch's patches and itself
    (:class:`CrossAttentionToken`), is projected back (``g``) and replaces the CLS. Patches pass
    through unchanged.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.CrossViTFusion(8, 16, num_heads=2, rngs=nnx.Rngs(0))
    >>> xs, xl = m(jax.numpy.ones((1, 17, 8)), jax.numpy.ones((1, 5, 16)))
    >>> xs.shape, xl.shape
    ((1, 17, 8), (1, 5, 16))
    """

    def __init__(
        self,
        small_features: int,
        large_features: int,
        *,
        num_heads: int,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        Cs, Cl = (
            _checks.positive_int("small_features", small_features),
            _checks.positive_int("large_features", large_features),
        )
        kw = dict(dtype=dtype, rngs=rngs)
        self.small_features, self.large_features = Cs, Cl
        self.f_s, self.g_s = (
            _Projector(Cs, Cl, **kw),
            _Projector(Cl, Cs, **kw),
        )  # small CLS into the large branch
        self.f_l, self.g_l = _Projector(Cl, Cs, **kw), _Projector(Cs, Cl, **kw)
        self.to_large = CrossAttentionToken(num_heads, Cl, implementation=implementation, **kw)
        self.to_small = CrossAttentionToken(num_heads, Cs, implementation=implementation, **kw)

    def __call__(self, xs: Float[Array, "B Ns Cs"], xl: Float[Array, "B Nl Cl"]):
        for name, x, c in (("xs", xs, self.small_features), ("xl", xl, self.large_features)):
            if x.ndim != 3 or x.shape[-1] != c or x.shape[1] < 2:
                raise ValueError(f"{name} must have shape [batch, 1 + patches, {c}]; got {x.shape}")
        cls_s = self.g_s(self.to_large(jnp.concatenate([self.f_s(xs[:, :1]), xl[:, 1:]], 1)))
        cls_l = self.g_l(self.to_small(jnp.concatenate([self.f_l(xl[:, :1]), xs[:, 1:]], 1)))
        return jnp.concatenate([cls_s, xs[:, 1:]], 1), jnp.concatenate([cls_l, xl[:, 1:]], 1)


class _Attention(nnx.Module):
    """Pre-projected multi-head self-attention over ``[B, N, C]`` tokens (TNT's inner/outer)."""

    def __init__(self, num_heads, C, *, implementation, dtype, rngs):
        H, C, _ = _checks.head_features(num_heads, C)
        self.implementation = implementation
        self.query, self.key, self.value, self.out = head_projections(
            C, H, C // H, use_bias=False, dtype=dtype, rngs=rngs
        )

    def __call__(self, x, area: int = 1):
        q, k, v = self.query(x), self.key(x), self.value(x)
        return self.out(ops.area_attention(q, k, v, area=area, implementation=self.implementation))


class TNTBlock(nnx.Module):
    r"""Transformer in Transformer: ``n`` patches of ``m`` words. Inner (weights shared across
    patches) ``Y <- Y + MSA(LN(Y))``, ``Y <- Y + MLP(LN(Y))`` among each patch's words; fuse
    ``Z_i <- Z_i + FC(vec(LN(Y_i)))``; outer ``Z <- Z + MSA(LN(Z))``, ``Z <- Z + MLP(LN(Z))`` over
    the CLS and the patches. The inner attention is :func:`attnjax.ops.area_attention` with one
    area per patch (patches as a batch; its reference is the chunked mask over all words).

    ``words [B, n m, c]`` (patch after patch), ``patches [B, 1 + n, d]`` (CLS first).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.TNTBlock(16, 8, words=4, outer_heads=2, inner_heads=2, rngs=nnx.Rngs(0))
    >>> y, z = m(jnp.ones((1, 12, 8)), jnp.ones((1, 4, 16)))
    >>> y.shape, z.shape
    ((1, 12, 8), (1, 4, 16))
    """

    def __init__(
        self,
        outer_features: int,
        inner_features: int,
        *,
        words: int,
        outer_heads: int,
        inner_heads: int,
        mlp_ratio: float = 4.0,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        d, c = (
            _checks.positive_int("outer_features", outer_features),
            _checks.positive_int("inner_features", inner_features),
        )
        self.words, self.outer_features, self.inner_features = _checks.positive_int("words", words), d, c
        kw = dict(dtype=dtype, rngs=rngs)
        self.inner_norm1, self.inner_norm2, self.proj_norm = (layer_norm(c, **kw) for _ in range(3))
        self.inner_attn = _Attention(inner_heads, c, implementation=implementation, **kw)
        self.inner_mlp = Mlp(c, ratio=mlp_ratio, **kw)
        self.proj = linear(words * c, d, ("mlp", "embed"), **kw)
        self.outer_norm1, self.outer_norm2 = (layer_norm(d, **kw) for _ in range(2))
        self.outer_attn = _Attention(outer_heads, d, implementation=implementation, **kw)
        self.outer_mlp = Mlp(d, ratio=mlp_ratio, **kw)

    def __call__(self, words: Float[Array, "B W c"], patches: Float[Array, "B P d"]):
        B, P, d = _checks.check_rank("patches", patches, ("batch", "1 + patches", "features"))
        n = P - 1
        if words.shape != (B, n * self.words, self.inner_features) or d != self.outer_features:
            raise ValueError(
                f"words must be [B, n * m = {n * self.words}, c={self.inner_features}] and patches "
                f"[B, 1 + n, d={self.outer_features}]; got {words.shape} and {patches.shape}"
            )
        words = words + self.inner_attn(self.inner_norm1(words), area=n)
        words = words + self.inner_mlp(self.inner_norm2(words))
        fused = self.proj(self.proj_norm(words).reshape(B, n, self.words * self.inner_features))
        patches = jnp.concatenate([patches[:, :1], patches[:, 1:] + fused], 1)
        patches = patches + self.outer_attn(self.outer_norm1(patches))
        return words, patches + self.outer_mlp(self.outer_norm2(patches))


class TokenCenters(nnx.Variable):
    """CATANet's token centres ``[M, C]``: state moved by an exponential moving average of the
    tokens assigned to each centre, not a trained Param."""


class CATANetAttention(nnx.Module):
    r"""CATANet's token-aggregation attention (IASA + IRCA) on ``[B, N, C]`` tokens: tokens are
    assigned to ``M`` centres by cosine similarity (:func:`attnjax.ops.cosine_assign`), sorted by
    centre, and attend within sorted groups of ``group`` (and the next group); every token also
    attends to the ``M`` projected centres (:func:`attnjax.ops.token_aggregation_attention`).
    With ``update=True`` (training) the centres move towards the mean of their tokens,
    ``mu <- momentum mu + (1 - momentum) mean(x -> mu)`` (one k-means step per call, no gradient).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.CATANetAttention(2, 16, num_centers=4, group=8, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 30, 16)), update=True).shape
    (1, 30, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        num_centers: int = 8,
        group: int = 128,
        momentum: float = 0.999,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, _ = _checks.head_features(num_heads, in_features)
        M = _checks.positive_int("num_centers", num_centers)
        self.group, self.momentum, self.in_features = _checks.positive_int("group", group), momentum, C
        self.implementation = implementation
        self.query, self.key, self.value, self.out = head_projections(
            C, H, C // H, use_bias=False, dtype=dtype, rngs=rngs
        )
        self.centers = TokenCenters(jax.random.normal(rngs.params(), (M, C)))

    def __call__(self, x: Float[Array, "B N C"], *, update: bool = False) -> Float[Array, "B N C"]:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [batch, tokens, C={self.in_features}]; got {x.shape}")
        mu = self.centers[...]
        assignment = ops.cosine_assign(x, mu)
        centers = mu[None].astype(x.dtype)
        out = ops.token_aggregation_attention(
            self.query(x),
            self.key(x),
            self.value(x),
            assignment,
            group=self.group,
            center_k=self.key(centers),
            center_v=self.value(centers),
            implementation=self.implementation,
        )
        if update:
            onehot = jax.nn.one_hot(assignment, mu.shape[0], dtype=jnp.float32)  # [B, N, M]
            sums = jnp.einsum("bnm,bnc->mc", onehot, jax.lax.stop_gradient(x).astype(jnp.float32))
            counts = onehot.sum((0, 1))[:, None]
            mean = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), mu)
            self.centers[...] = self.momentum * mu + (1 - self.momentum) * mean
        return self.out(out)


def box_deltas(boxes: Float[Array, "B M 4"], size: int, stride: float, axis: int, mode: str) -> Array:
    """BoxRPB's inputs along one axis: ``[x1 - p, x2 - p]`` for pixel centres ``p = (i + 0.5)
    stride`` (``axis`` 0: x from ``(x1, x2)``, 1: y from ``(y1, y2)``), ``[B, M, size, 2]``;
    ``mode="abs_log8"`` maps ``d -> sign(d) log2(|d| + 1) / 3``."""
    centres = (jnp.arange(size, dtype=jnp.float32) + 0.5) * stride
    corners = boxes[..., jnp.array([axis, axis + 2])].astype(jnp.float32)  # [B, M, 2]
    d = corners[:, :, None, :] - centres[:, None]  # [B, M, size, 2]
    if mode == "abs_log8":
        d = jnp.sign(d) * jnp.log2(jnp.abs(d) + 1.0) / 3.0
    return d


class BoxRPBCrossAttention(nnx.Module):
    r"""Plain DETR's decoder cross-attention with the box-to-pixel relative position bias:
    object queries ``[B, M, C]`` with boxes ``(x1, y1, x2, y2)`` (pixels) attend to an ``h x w``
    memory ``[B, h w, C]`` (row-major) with logits ``q.k / sqrt(d) + B_y[i] + B_x[j]`` for pixel
    ``(i, j)``, ``B_x = MLP_1(box_deltas x)``, ``B_y = MLP_2(box_deltas y)`` (``Linear(2 -> hidden)
    -ReLU-Linear(hidden -> heads, no bias)``). The bias goes in through
    :func:`attnjax.score_mods.separable_bias`: the MLPs run ``M (h + w)`` times and no
    ``[M, h w]`` bias is formed.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.BoxRPBCrossAttention(2, 16, hidden=8, rngs=nnx.Rngs(0))
    >>> boxes = jnp.array([[[1.0, 1.0, 5.0, 3.0]]])
    >>> m(jnp.ones((1, 1, 16)), boxes, jnp.ones((1, 24, 16)), (4, 6)).shape
    (1, 1, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        hidden: int = 512,
        mode: str = "linear",
        stride: float = 1.0,
        use_bias: bool = True,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if mode not in ("linear", "abs_log8"):
            raise ValueError(f"BoxRPBCrossAttention mode must be 'linear' or 'abs_log8'; got {mode!r}")
        H, C, _ = _checks.head_features(num_heads, in_features)
        self.mode, self.stride, self.in_features, self.implementation = mode, stride, C, implementation
        self.query, self.key, self.value, self.out = head_projections(
            C, H, C // H, use_bias=use_bias, dtype=dtype, rngs=rngs
        )
        hid = _checks.positive_int("hidden", hidden)
        mlp = lambda: nnx.List(
            [
                linear(2, hid, (None, "mlp"), dtype=dtype, rngs=rngs),
                linear(hid, H, ("mlp", "heads"), use_bias=False, dtype=dtype, rngs=rngs),
            ]
        )
        self.mlp_x, self.mlp_y = mlp(), mlp()

    def biases(self, boxes: Float[Array, "B M 4"], grid: tuple[int, int]):
        """``(B_y [B, M, h, H], B_x [B, M, w, H])``."""
        run = lambda mlp, d: mlp[1](jax.nn.relu(mlp[0](d)))
        h, w = grid
        return (
            run(self.mlp_y, box_deltas(boxes, h, self.stride, 1, self.mode)),
            run(self.mlp_x, box_deltas(boxes, w, self.stride, 0, self.mode)),
        )

    def __call__(
        self,
        queries: Float[Array, "B M C"],
        boxes: Float[Array, "B M 4"],
        memory: Float[Array, "B N C"],
        grid: tuple[int, int],
    ) -> Float[Array, "B M C"]:
        h, w = grid
        if memory.ndim != 3 or memory.shape[1] != h * w:
            raise ValueError(f"memory must have shape [batch, h * w = {h * w}, C]; got {memory.shape}")
        if boxes.shape != queries.shape[:2] + (4,):
            raise ValueError(
                f"boxes must have shape {queries.shape[:2] + (4,)} (x1, y1, x2, y2); got {boxes.shape}"
            )
        by, bx = self.biases(boxes, grid)
        mod = score_mods.separable_bias(by, bx, w)
        out = ops.attention(
            self.query(queries),
            self.key(memory),
            self.value(memory),
            score_mod=mod,
            implementation=self.implementation,
        )
        return self.out(out)


__all__ = [
    "BoxRPBCrossAttention",
    "CATANetAttention",
    "ChannelGroupAttention",
    "CrossAttentionToken",
    "CrossViTFusion",
    "DaViTBlock",
    "TNTBlock",
    "TokenCenters",
    "box_deltas",
]
