"""CNN attention modules with aggregation: MIRNet's dual attention unit and selective kernel
feature fusion, DANet's position and channel attention modules, and TAP (token-aware average
pooling). Channel-last ``[B, h, w, C]``.

Letter legend: B batch, (h, w) map, C channels, L streams.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, ops
from attnjax.nn.cnn.common import PReLU, conv
from attnjax.nn.cnn.gates import SpatialGate
from attnjax.nn.sharding import param


def _check_map(x, C):
    if x.ndim != 4 or x.shape[-1] != C:
        raise ValueError(f"x must have shape [batch, height, width, C={C}] (channel-last); got {x.shape}")


class DualAttentionUnit(nnx.Module):
    r"""MIRNet's dual attention unit (Zamir et al., ECCV 2020):
    ``M = Conv_{3x3}(PReLU(Conv_{3x3}(x)))``; spatial branch ``SA = M sigmoid(Conv_{5x5}([max_C M;
    mean_C M]))``; channel branch ``CA = M sigmoid(Conv_{1x1}(ReLU(Conv_{1x1}(GAP(M)))))``
    (``C -> C / reduction -> C``); ``out = x + Conv_{1x1}([SA; CA])``.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> nn.cnn.DualAttentionUnit(16, rngs=nnx.Rngs(0))(jax.numpy.ones((1, 5, 6, 16))).shape
    (1, 5, 6, 16)
    """

    def __init__(
        self,
        features: int,
        *,
        reduction: int = 8,
        kernel: int = 3,
        use_bias: bool = False,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        C = self.features = _checks.positive_int("features", features)
        kw = dict(dtype=dtype, rngs=rngs)
        self.body1 = conv(C, C, kernel, use_bias=use_bias, names=("embed", None), **kw)
        self.act = PReLU()
        self.body2 = conv(C, C, kernel, use_bias=use_bias, names=(None, "embed"), **kw)
        self.spatial = SpatialGate(kernel=5, **kw)
        hidden = max(C // _checks.positive_int("reduction", reduction), 1)
        self.ca1 = conv(C, hidden, 1, use_bias=use_bias, names=("embed", "mlp"), **kw)
        self.ca2 = conv(hidden, C, 1, use_bias=use_bias, names=("mlp", "embed"), **kw)
        self.fuse = conv(2 * C, C, 1, use_bias=use_bias, names=(None, "embed"), **kw)

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        _check_map(x, self.features)
        m = self.body2(self.act(self.body1(x)))
        sa = self.spatial(m)
        ca = m * jax.nn.sigmoid(self.ca2(jax.nn.relu(self.ca1(m.mean((1, 2), keepdims=True)))))
        return x + self.fuse(jnp.concatenate([sa, ca], -1))


class SKFF(nnx.Module):
    r"""MIRNet's selective kernel feature fusion of ``L`` streams: ``U = sum_i L_i``,
    ``z = PReLU(Conv_{1x1}(GAP(U)))`` (``C -> max(C / reduction, 4)``), ``v_i = Conv_{1x1, i}(z)``,
    ``s = softmax_i(v)`` per channel, ``out = sum_i s_i L_i``.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.cnn.SKFF(16, streams=3, rngs=nnx.Rngs(0))
    >>> m([jax.numpy.ones((1, 5, 6, 16))] * 3).shape
    (1, 5, 6, 16)
    """

    def __init__(
        self,
        features: int,
        *,
        streams: int = 3,
        reduction: int = 8,
        use_bias: bool = False,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        C = self.features = _checks.positive_int("features", features)
        self.streams = _checks.positive_int("streams", streams)
        d = max(C // _checks.positive_int("reduction", reduction), 4)
        kw = dict(dtype=dtype, rngs=rngs)
        self.squeeze = conv(C, d, 1, use_bias=use_bias, names=("embed", "mlp"), **kw)
        self.act = PReLU()
        self.excite = nnx.List(
            [conv(d, C, 1, use_bias=use_bias, names=("mlp", "embed"), **kw) for _ in range(streams)]
        )

    def weights(self, streams) -> Float[Array, "L B 1 1 C"]:
        """The per-channel stream weights (summing to 1 over the streams)."""
        u = sum(streams)
        z = self.act(self.squeeze(u.mean((1, 2), keepdims=True)))
        v = jnp.stack([e(z) for e in self.excite])
        return jax.nn.softmax(v.astype(jnp.float32), axis=0)

    def __call__(self, streams) -> Float[Array, "B h w C"]:
        if len(streams) != self.streams:
            raise ValueError(f"SKFF was built for {self.streams} streams; got {len(streams)}")
        for x in streams:
            _check_map(x, self.features)
        s = self.weights(streams)
        return sum(si.astype(x.dtype) * x for si, x in zip(s, streams))


class PositionAttention(nnx.Module):
    r"""DANet's position attention module (PAM): ``B, C' = Conv_{1x1}(A)`` (``C -> C / 8``),
    ``D = Conv_{1x1}(A)``, ``S = softmax_j(B_i . C'_j)`` (no ``1 / sqrt(d)``),
    ``E = gamma (S D) + A`` with ``gamma`` starting at 0: :func:`attnjax.ops.attention` with
    ``scale=1`` over the ``h w`` positions (blockwise, ``O(h w)`` memory).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> nn.cnn.PositionAttention(16, rngs=nnx.Rngs(0))(jax.numpy.ones((1, 5, 6, 16))).shape
    (1, 5, 6, 16)
    """

    def __init__(self, features: int, *, reduction: int = 8, implementation=None, dtype=None, rngs: nnx.Rngs):
        C = self.features = _checks.positive_int("features", features)
        d = max(C // _checks.positive_int("reduction", reduction), 1)
        kw = dict(dtype=dtype, rngs=rngs)
        self.query, self.key = (conv(C, d, 1, names=("embed", "mlp"), **kw) for _ in range(2))
        self.value = conv(C, C, 1, names=("embed", None), **kw)
        self.gamma = param(jnp.zeros((1,)), None)
        self.implementation = implementation

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        _check_map(x, self.features)
        B, h, w, C = x.shape
        flat = lambda t: t.reshape(B, h * w, 1, t.shape[-1])
        out = ops.attention(
            flat(self.query(x)),
            flat(self.key(x)),
            flat(self.value(x)),
            scale=1.0,
            implementation=self.implementation,
        )
        return self.gamma[...].astype(x.dtype) * out.reshape(x.shape) + x


class ChannelAttentionModule(nnx.Module):
    r"""DANet's channel attention module (CAM): with ``X = A`` as ``[C, N]``,
    ``attn = softmax(rowmax(X X^T) - X X^T) = softmax(-X X^T)`` (channels attend to the least
    similar channels), ``E = beta (attn X) + A``, ``beta`` starting at 0:
    :func:`attnjax.ops.channel_attention` with ``scale=-1``, ``O(N C^2)``.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> nn.cnn.ChannelAttentionModule(implementation=None)(jax.numpy.ones((1, 5, 6, 16))).shape
    (1, 5, 6, 16)
    """

    def __init__(self, *, implementation=None):
        self.beta = param(jnp.zeros((1,)), None)
        self.implementation = implementation

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        if x.ndim != 4:
            raise ValueError(f"x must have shape [batch, height, width, C] (channel-last); got {x.shape}")
        B, h, w, C = x.shape
        flat = x.reshape(B, h * w, C)
        out = ops.channel_attention(flat, flat, flat, scale=-1.0, implementation=self.implementation)
        return self.beta[...].astype(x.dtype) * out.reshape(x.shape) + x


class TokenAwarePooling(nnx.Module):
    r"""TAP, token-aware average pooling ("Robustifying Token Attention for Vision Transformers",
    Guo, Stutz, Schiele, ICCV 2023; read from the paper, code not checked): each token becomes a
    token-specific mixture of ``K`` average-pooled neighbourhoods,
    ``x_i <- sum_k w_ik AvgPool_k(X)_i``, ``w_i = softmax_k(f(X)_i)`` with ``f`` a light conv
    predictor (depthwise 3x3, then a 1x1 conv to ``K`` logits). ``pool_sizes`` lists the
    (odd, stride-1, ``SAME``) window sides; 1 is the identity.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> nn.cnn.TokenAwarePooling(16, rngs=nnx.Rngs(0))(jax.numpy.ones((1, 5, 6, 16))).shape
    (1, 5, 6, 16)
    """

    def __init__(self, features: int, *, pool_sizes: tuple[int, ...] = (1, 3, 5), dtype=None, rngs: nnx.Rngs):
        C = self.features = _checks.positive_int("features", features)
        if not pool_sizes or any(p < 1 or p % 2 == 0 for p in pool_sizes):
            raise ValueError(f"pool_sizes must be odd positive window sides; got {pool_sizes}")
        self.pool_sizes = tuple(pool_sizes)
        self.dw = conv(C, C, 3, groups=C, dtype=dtype, rngs=rngs)
        self.logits = conv(
            C,
            len(pool_sizes),
            1,
            names=("embed", None),
            kernel_init=nnx.initializers.zeros,
            dtype=dtype,
            rngs=rngs,
        )

    def pooled(self, x: Array) -> Float[Array, "K B h w C"]:
        # count_include_pad=False: a border token averages only the pixels that exist
        ones = jnp.ones(x.shape[:3] + (1,), x.dtype)
        pool = lambda t, p: nnx.avg_pool(t, (p, p), strides=(1, 1), padding="SAME", count_include_pad=True)
        return jnp.stack([x if p == 1 else pool(x, p) / pool(ones, p) for p in self.pool_sizes])

    def __call__(self, x: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
        _check_map(x, self.features)
        w = jax.nn.softmax(self.logits(jax.nn.gelu(self.dw(x))).astype(jnp.float32), axis=-1)  # [B, h, w, K]
        w = jnp.moveaxis(w, -1, 0)[..., None].astype(x.dtype)
        return jnp.sum(w * self.pooled(x), axis=0)


__all__ = ["SKFF", "ChannelAttentionModule", "DualAttentionUnit", "PositionAttention", "TokenAwarePooling"]
