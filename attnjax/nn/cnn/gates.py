"""CNN attention gates (no ``q . k``): CBAM, triplet attention, ELA, ULSAM and the DAS deformable
gate, channel-last ``[B, h, w, C]``.

Letter legend: B batch, (h, w) map, C channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, ops
from attnjax.nn.cnn.common import apply, conv, zpool
from attnjax.nn.cnn.common import norm as make_norm
from attnjax.nn.sharding import linear


def _check_map(x, C=None):
    if x.ndim != 4 or (C is not None and x.shape[-1] != C):
        raise ValueError(
            f"x must have shape [batch, height, width, C={C or 'C'}] (channel-last); got {x.shape}"
        )


class SpatialGate(nnx.Module):
    r"""``x * sigmoid(norm(Conv_{k x k}([max_C x; mean_C x])))``: CBAM's spatial attention, the
    identity branch of triplet attention, MIRNet's spatial attention (``kernel=5``)."""

    def __init__(self, *, kernel: int = 7, norm_kind: str | None = None, dtype=None, rngs: nnx.Rngs):
        # a one-channel conv: its bias stands in for the official BN's shift when there is no norm
        self.conv = conv(2, 1, kernel, use_bias=norm_kind is None, names=(None, None), dtype=dtype, rngs=rngs)
        self.norm = make_norm(norm_kind, 1, name=None, dtype=dtype, rngs=rngs)

    def gate(self, x: Array) -> Array:
        """The ``[B, h, w, 1]`` sigmoid map."""
        return jax.nn.sigmoid(apply(self.norm, self.conv(zpool(x))))

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        return x * self.gate(x)


class ChannelGate(nnx.Module):
    r"""CBAM's channel attention: ``x * sigmoid(MLP(avg_{hw} x) + MLP(max_{hw} x))``, one shared
    MLP ``C -> C / reduction -> C`` (ReLU)."""

    def __init__(self, features: int, *, reduction: int = 16, dtype=None, rngs: nnx.Rngs):
        C = _checks.positive_int("features", features)
        hidden = max(C // _checks.positive_int("reduction", reduction), 1)
        self.fc1 = linear(C, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = linear(hidden, C, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        mlp = lambda z: self.fc2(jax.nn.relu(self.fc1(z)))
        s = mlp(x.mean((1, 2), keepdims=True)) + mlp(x.max((1, 2), keepdims=True))
        return x * jax.nn.sigmoid(s)


class CBAM(nnx.Module):
    r"""Convolutional Block Attention Module (Woo et al., ECCV 2018): ``F' = M_c(F) F``,
    ``F'' = M_s(F') F'`` (:class:`ChannelGate` then :class:`SpatialGate`; the official spatial
    conv is followed by BN, ``norm="batch"``).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.cnn.CBAM(32, rngs=nnx.Rngs(0))
    >>> m(jax.numpy.ones((1, 5, 6, 32))).shape
    (1, 5, 6, 32)
    """

    def __init__(
        self,
        features: int,
        *,
        reduction: int = 16,
        kernel: int = 7,
        norm: str | None = None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.features = _checks.positive_int("features", features)
        self.channel = ChannelGate(features, reduction=reduction, dtype=dtype, rngs=rngs)
        self.spatial = SpatialGate(kernel=kernel, norm_kind=norm, dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        _check_map(x, self.features)
        return self.spatial(self.channel(x))


# each branch: the axis pooled away (it plays the channel role) and the order of the conv plane,
# as the official permutations lay them out: (C, W) with H pooled, (H, C) with W pooled, (H, W)
_TRIPLET = ((0, 3, 2, 1), (0, 1, 3, 2), (0, 1, 2, 3))


class TripletAttention(nnx.Module):
    r"""Triplet attention (Misra et al., WACV 2021): three :class:`SpatialGate` branches, each on
    the map rotated so that ``H``, ``W`` or ``C`` plays the channel role (Z-pool over it, a
    ``k x k`` conv over the other two), averaged: ``y = (y_{CH} + y_{CW} + y_{HW}) / 3``
    (``no_spatial``: the first two, ``/ 2``). No channel count is needed.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> nn.cnn.TripletAttention(rngs=nnx.Rngs(0))(jax.numpy.ones((1, 5, 6, 8))).shape
    (1, 5, 6, 8)
    """

    def __init__(
        self,
        *,
        kernel: int = 7,
        no_spatial: bool = False,
        norm: str | None = None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        n = 2 if no_spatial else 3
        self.branches = nnx.List(
            [SpatialGate(kernel=kernel, norm_kind=norm, dtype=dtype, rngs=rngs) for _ in range(n)]
        )

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        _check_map(x)
        outs = [
            jnp.transpose(gate(jnp.transpose(x, perm)), perm) for gate, perm in zip(self.branches, _TRIPLET)
        ]
        return sum(outs) / len(outs)


class ELA(nnx.Module):
    r"""Efficient local attention (Xu and Wan, 2024): strip means ``z_h = mean_w x``,
    ``z_w = mean_h x``, one shared depthwise 1-D conv (``kernel``, no bias) and one shared
    GroupNorm, ``y = sigmoid(GN(conv(z)))``; ``out = x * y_h[:, :, None] * y_w[:, None, :]``.
    The paper's variants differ in ``kernel`` (5 or 7) and ``groups`` (table not re-checked).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> nn.cnn.ELA(32, rngs=nnx.Rngs(0))(jax.numpy.ones((1, 5, 6, 32))).shape
    (1, 5, 6, 32)
    """

    def __init__(self, features: int, *, kernel: int = 7, groups: int = 16, dtype=None, rngs: nnx.Rngs):
        C = self.features = _checks.positive_int("features", features)
        g = _checks.positive_int("groups", groups)
        if C % g:
            raise ValueError(f"groups={g} must divide features={C}")
        self.conv = conv(C, C, (kernel,), groups=C, use_bias=False, dtype=dtype, rngs=rngs)
        self.norm = make_norm("group", C, groups=g, dtype=dtype, rngs=rngs)

    def strip(self, z: Float[Array, "B L C"]) -> Float[Array, "B L C"]:
        return jax.nn.sigmoid(self.norm(self.conv(z)))

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        _check_map(x, self.features)
        y_h, y_w = self.strip(x.mean(2)), self.strip(x.mean(1))
        return x * y_h[:, :, None, :] * y_w[:, None, :, :]


class ULSAM(nnx.Module):
    r"""Ultra-lightweight subspace attention (Saini et al., WACV 2020): the channels split into
    ``groups`` subspaces ``F_n``; per subspace one map summing to 1 over all positions,

    .. math::

        A_n = \mathrm{softmax}_{hw}\Big(\mathrm{Conv}_{1\times1}^{C/g \to 1}\big(\mathrm{MaxPool}_{3\times3/1}(
        \mathrm{ReLU}(\mathrm{norm}(\mathrm{DWConv}_{1\times1}(F_n))))\big)\Big),\qquad F_n \leftarrow A_n F_n + F_n

    (``norm`` defaults to a GroupNorm per subspace; ``norm="batch"`` is the official BN; the
    BN after the point conv is only applied with ``norm="batch"``).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> nn.cnn.ULSAM(8, groups=4, rngs=nnx.Rngs(0))(jax.numpy.ones((1, 5, 6, 8))).shape
    (1, 5, 6, 8)
    """

    def __init__(
        self, features: int, *, groups: int = 4, norm: str | None = "group", dtype=None, rngs: nnx.Rngs
    ):
        C = self.features = _checks.positive_int("features", features)
        g = self.groups = _checks.positive_int("groups", groups)
        if C % g:
            raise ValueError(f"groups={g} must divide features={C}")
        self.dw = conv(C, C, 1, groups=C, dtype=dtype, rngs=rngs)
        self.norm = make_norm(norm, C, groups=g, dtype=dtype, rngs=rngs)
        self.point = conv(C, g, 1, groups=g, names=("embed", None), dtype=dtype, rngs=rngs)
        self.point_norm = (
            make_norm("batch", g, name=None, dtype=dtype, rngs=rngs) if norm == "batch" else None
        )

    def maps(self, x: Array) -> Float[Array, "B h w g"]:
        """The ``groups`` attention maps, each summing to 1 over the ``h w`` positions."""
        z = jax.nn.relu(apply(self.norm, self.dw(x)))
        z = nnx.max_pool(z, (3, 3), strides=(1, 1), padding="SAME")
        logits = apply(self.point_norm, self.point(z))
        B, h, w, g = logits.shape
        return jax.nn.softmax(logits.reshape(B, h * w, g).astype(jnp.float32), axis=1).reshape(logits.shape)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        _check_map(x, self.features)
        a = jnp.repeat(self.maps(x), self.features // self.groups, axis=-1).astype(x.dtype)
        return a * x + x


class DeformableGate(nnx.Module):
    r"""The DAS deformable attention gate (Salajegheh et al., 2023; no official code, as the
    third-party reimplementations): ``z = act(IN(PW(DW_{3x3}(x))))`` (``C -> alpha C``), offsets by
    a 3x3 conv (``(dy, dx)`` for each of the 9 taps, zero-initialized), a deformable 3x3 conv
    ``alpha C -> C`` sampling ``z`` at ``p + p_k + dp_k(p)`` (:func:`attnjax.ops.bilinear_gather`,
    zero padding), LayerNorm, sigmoid: ``y = x * gate``, so ``|y| <= |x|``.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> nn.cnn.DeformableGate(16, rngs=nnx.Rngs(0))(jax.numpy.ones((1, 5, 6, 16))).shape
    (1, 5, 6, 16)
    """

    def __init__(self, features: int, *, alpha: float = 0.2, dtype=None, rngs: nnx.Rngs):
        C = self.features = _checks.positive_int("features", features)
        r = max(round(alpha * C), 1)
        self.dw = conv(C, C, 3, groups=C, dtype=dtype, rngs=rngs)
        self.pw = conv(C, r, 1, names=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.norm = make_norm("instance", r, name="mlp", dtype=dtype, rngs=rngs)
        zeros = nnx.initializers.zeros
        self.offsets = conv(r, 18, 3, names=("mlp", None), kernel_init=zeros, dtype=dtype, rngs=rngs)
        self.deform = nnx.Param(
            nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)(rngs.params(), (9, r, C)),
            out_sharding=(None, "mlp", "embed"),
            eager_sharding=False,
        )
        self.out_norm = make_norm("layer", C, dtype=dtype, rngs=rngs)

    def deformable_conv(
        self, z: Float[Array, "B h w r"], offsets: Float[Array, "B h w 18"]
    ) -> Float[Array, "B h w C"]:
        """A 3x3 deformable convolution of ``z`` (no bias): tap ``k`` reads ``z`` at
        ``p + p_k + offsets[..., 2k:2k+2]`` (``(dy, dx)``)."""
        B, h, w, _ = z.shape
        ty, tx = jnp.divmod(jnp.arange(9), 3)
        yy, xx = jnp.meshgrid(
            jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
        )
        off = offsets.astype(jnp.float32).reshape(B, h, w, 9, 2)
        py = yy[..., None] + (ty - 1) + off[..., 0]
        px = xx[..., None] + (tx - 1) + off[..., 1]
        sampled = ops.bilinear_gather(z, jnp.stack([px, py], -1), normalized=False)  # [B, h, w, 9, r]
        return jnp.einsum("bhwkr,krc->bhwc", sampled, self.deform[...].astype(z.dtype))

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        _check_map(x, self.features)
        z = jax.nn.gelu(self.norm(self.pw(self.dw(x))), approximate=False)
        gate = jax.nn.sigmoid(self.out_norm(self.deformable_conv(z, self.offsets(z))))
        return x * gate


__all__ = ["CBAM", "ELA", "ULSAM", "ChannelGate", "DeformableGate", "SpatialGate", "TripletAttention"]
