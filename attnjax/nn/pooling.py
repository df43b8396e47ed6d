"""Attention-replacement and pooling layers of zoo part 3 (issue 22): Gaussian adaptive attention
(a density gate over an axis, no ``q . k``), LAMA's low-rank multi-head attention pooling, and
NiNformer's token-mixing generated gating.

Letter legend: B batch, T tokens, H heads, C features, G Gaussians, r rank.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, ops
from attnjax.nn.sharding import layer_norm, linear, param


def gaussian_mixture_weights(
    x: Array, offsets: Array, scales: Array, *, axis: int, eps: float = 1e-8
) -> Array:
    r"""The density weights of Gaussian adaptive attention over ``axis`` of ``x`` (one head):

    .. math::

        y_g = \frac{x - (\mu + \delta_g)}{\sigma}, \quad
        m = \prod_g \frac{e^{-y_g^2 / (2 c_g^2)}}{\sqrt{2 \pi c_g^2}}, \quad
        w = m \big/ \max(\textstyle\sum_{axis} m,\ \epsilon)

    with ``mu`` the mean and ``sigma^2`` the unbiased variance ``+ eps`` along ``axis`` (as the
    official code's ``torch.var``); ``offsets`` ``delta`` and ``scales`` ``c`` are ``[G]``. The
    product is taken in log space (the same value, no underflow of a product of small densities).

    >>> import jax.numpy as jnp
    >>> w = gaussian_mixture_weights(jnp.ones((2, 5)), jnp.zeros(2), jnp.ones(2), axis=1)
    >>> bool(jnp.allclose(w, 0.2))  # constant input: uniform weights
    True
    """
    x = x.astype(jnp.float32)
    mean = x.mean(axis, keepdims=True)
    n = x.shape[axis]
    var = ((x - mean) ** 2).sum(axis, keepdims=True) / max(n - 1, 1) + eps
    log_m = 0.0
    for g in range(offsets.shape[0]):
        c2 = scales[g].astype(jnp.float32) ** 2
        y = (x - (mean + offsets[g])) / jnp.sqrt(var)
        log_m = log_m - y * y / (2.0 * c2) - 0.5 * jnp.log(2.0 * math.pi * c2)
    # m / sum(m) with the shared factor exp(max) taken out; the eps floor of the official code
    # applies to the true sum, so it is compared in the same scale
    top = jax.lax.stop_gradient(jnp.max(log_m, axis, keepdims=True))
    m = jnp.exp(log_m - top)
    return m / jnp.maximum(m.sum(axis, keepdims=True), eps * jnp.exp(-top))


class GaussianAdaptiveAttention(nnx.Module):
    r"""Multi-head Gaussian adaptive attention ("Gaussian Adaptive Attention is All You Need",
    Ioannides, Chadha & Elkins, 2024; official gioannides/Gaussian-Adaptive-Attention).

    ``x`` is cut along ``norm_axis`` into ``num_heads`` chunks (the last takes the remainder, as
    the official ``MultiHeadGaussianAdaptiveAttention``); each chunk is multiplied by its own
    :func:`gaussian_mixture_weights` along that axis (learned ``G`` offsets, zero at init, and
    scales, ``N(0, 1)`` at init as the official code). No queries or keys: a density gate that
    sums to one along the axis. Padding (the official ``padding_value``) is not handled.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.GaussianAdaptiveAttention(norm_axis=1, num_heads=2, num_gaussians=3, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (2, 10, 8))).shape
    (2, 10, 8)
    """

    def __init__(
        self, *, norm_axis: int, num_heads: int, num_gaussians: int, eps: float = 1e-8, rngs: nnx.Rngs
    ):
        H = _checks.positive_int("num_heads", num_heads)
        G = _checks.positive_int("num_gaussians", num_gaussians)
        self.norm_axis, self.eps = norm_axis, eps
        self.offsets = param(jnp.zeros((H, G)), "heads", None)
        self.scales = param(jax.random.normal(rngs.params(), (H, G)), "heads", None)

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """``(start, stop)`` of each head's chunk of an axis of length ``n``."""
        H = self.offsets.shape[0]
        size = n // H
        if size == 0:
            raise ValueError(f"the norm axis has {n} entries, fewer than num_heads={H}")
        return [(h * size, (h + 1) * size if h < H - 1 else n) for h in range(H)]

    def weights(self, x: Array) -> Array:
        """The per-head mixture weights, shaped like ``x``."""
        axis = self.norm_axis % x.ndim
        parts = [
            gaussian_mixture_weights(
                jax.lax.slice_in_dim(x, a, b, axis=axis),
                self.offsets[h],
                self.scales[h],
                axis=axis,
                eps=self.eps,
            )
            for h, (a, b) in enumerate(self.chunks(x.shape[axis]))
        ]
        return jnp.concatenate(parts, axis)

    def __call__(self, x: Array) -> Array:
        if not -x.ndim <= self.norm_axis < x.ndim:
            raise ValueError(f"norm_axis={self.norm_axis} is out of range for x of shape {x.shape}")
        return (x * self.weights(x)).astype(x.dtype)


class LAMAPooling(nnx.Module):
    r"""Low-rank factorized multi-head attention pooling (LAMA: "Low Rank Factorization for Compact
    Multi-Head Self-Attention", Mehta et al., 2019; a reading of the abstract).

    With states ``h_i`` (e.g. a GRU's) and the global context ``c = mean_i h_i``, head ``k`` scores
    ``e_ik = (P_k^T c) . f(Q_k^T h_i)`` (a bilinear form of rank ``r``, ``f`` an optional
    activation), ``a_k = softmax_i(e_k)`` and the sentence matrix row ``M_k = sum_i a_ik h_i``. That
    is :func:`attnjax.ops.attention` with one query per head, ``P^T c``, keys ``f(Q^T h)`` and the
    states as one shared value head (scale 1). Returns ``M`` ``[B, H, C]``.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.LAMAPooling(16, num_heads=3, rank=4, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (2, 9, 16))).shape
    (2, 3, 16)
    """

    def __init__(self, in_features: int, *, num_heads: int, rank: int, activation=None, rngs: nnx.Rngs):
        C = _checks.positive_int("in_features", in_features)
        H = _checks.positive_int("num_heads", num_heads)
        r = _checks.positive_int("rank", rank)
        self.in_features, self.activation = C, activation
        init = lambda: jax.random.normal(rngs.params(), (H, C, r)) / math.sqrt(C)
        self.p = param(init(), "heads", "embed", None)
        self.q = param(init(), "heads", "embed", None)

    def project(self, h: Float[Array, "B T C"]):
        """``(query [B, 1, H, r], keys [B, T, H, r], values [B, T, 1, C])``."""
        c = h.mean(1, keepdims=True)
        query = jnp.einsum("btc,hcr->bthr", c, self.p[...])
        keys = jnp.einsum("btc,hcr->bthr", h, self.q[...])
        if self.activation is not None:
            keys = self.activation(keys)
        return query, keys, h[:, :, None, :]

    def __call__(self, h: Float[Array, "B T C"]) -> Float[Array, "B H C"]:
        if h.ndim != 3 or h.shape[-1] != self.in_features:
            raise ValueError(f"h must have shape [batch, seq, in_features={self.in_features}]; got {h.shape}")
        return ops.attention(*self.project(h), scale=1.0)[:, 0]


class NiNformerGate(nnx.Module):
    r"""NiNformer's attention replacement ("NiNformer: A Network in Network Transformer with Token
    Mixing Generated Gating Function", 2024; the most faithful reading of the abstract).

    An inner MLP-Mixer generates a gate from the input, which scales a linear projection:

    .. math::

        U = X + W^t_2\, \mathrm{gelu}(W^t_1 \mathrm{LN}(X)^\top)^\top \ \text{(token mixing)},\quad
        G = \sigma\big(U + \mathrm{MLP}_c(\mathrm{LN}(U))\big),\quad Y = (X W_v) \odot G

    The token-mixing MLP works along the sequence, so the layer has a fixed length ``seq_len``.
    No ``q . k``: it is here so comparison suites can swap it for attention.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.NiNformerGate(16, seq_len=9, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (2, 9, 16))).shape
    (2, 9, 16)
    """

    def __init__(
        self,
        in_features: int,
        *,
        seq_len: int,
        token_hidden: int | None = None,
        channel_hidden: int | None = None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        C = _checks.positive_int("in_features", in_features)
        T = _checks.positive_int("seq_len", seq_len)
        Ht = _checks.positive_int("token_hidden", token_hidden or 2 * T)
        Hc = _checks.positive_int("channel_hidden", channel_hidden or 2 * C)
        self.in_features, self.seq_len = C, T
        self.value = linear(C, C, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.norm_tokens, self.norm_channels = layer_norm(C, rngs=rngs), layer_norm(C, rngs=rngs)
        self.token1 = linear(T, Ht, (None, None), dtype=dtype, rngs=rngs)
        self.token2 = linear(Ht, T, (None, None), dtype=dtype, rngs=rngs)
        self.channel1 = linear(C, Hc, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.channel2 = linear(Hc, C, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def gate(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        """``G = sigmoid(Mixer(x))``."""
        t = self.norm_tokens(x).transpose(0, 2, 1)  # [B, C, T]: mix along the sequence
        u = x + self.token2(jax.nn.gelu(self.token1(t))).transpose(0, 2, 1)
        return jax.nn.sigmoid(u + self.channel2(jax.nn.gelu(self.channel1(self.norm_channels(u)))))

    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        if x.ndim != 3 or x.shape[1:] != (self.seq_len, self.in_features):
            raise ValueError(
                f"x must have shape [batch, seq_len={self.seq_len}, in_features={self.in_features}]; "
                f"got {x.shape}"
            )
        return self.value(x) * self.gate(x)
