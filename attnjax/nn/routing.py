"""The routing attention module of "Efficient Content-Based Sparse Attention with Routing
Transformers" (Roy et al., 2021).

Letter legend: B batch, T tokens, H heads, C features, N clusters.
"""

from __future__ import annotations

from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, ops
from attnjax.nn.layers import head_projections
from attnjax.nn.sharding import axes


class Centroids(nnx.Variable):
    """k-means centroids ``[H, N, D]``: state updated by moving average, not a trained Param."""


class RoutingAttention(nnx.Module):
    r"""Self-attention within online k-means clusters (see :func:`attnjax.ops.routing_attention`).

    .. math::

        y = \mathrm{RoutingAttn}(x W_Q, x W_K, x W_V; \mu)\, W_O, \qquad
        \mu \leftarrow \lambda \mu + (1 - \lambda)\, \mathrm{mean}(x \to \mu) \text{ when } \texttt{update}

    The centroids ``mu`` are a :class:`Centroids` variable: an optimizer over ``nnx.Param``
    leaves them alone, and ``module(x, update=True)`` (training) moves them after computing the
    output with the current ones (:func:`attnjax.ops.routing_update` on this call's queries and keys).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.RoutingAttention(2, 16, num_clusters=4, is_causal=True, rngs=nnx.Rngs(0))
    >>> before = m.centroids[...]
    >>> y = m(jax.random.normal(jax.random.key(0), (1, 32, 16)), update=True)
    >>> y.shape, bool((m.centroids[...] != before).any())
    ((1, 32, 16), True)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        num_clusters: int,
        window: int | None = None,
        is_causal: bool = False,
        decay: float = 0.999,
        qkv_features: int | None = None,
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, qkv = _checks.head_features(num_heads, in_features, qkv_features)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1]; got {decay}")
        self.in_features, self.window, self.is_causal, self.decay = C, window, is_causal, decay
        self.implementation = implementation
        self.query, self.key, self.value, self.out = head_projections(
            C, H, qkv // H, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.centroids = Centroids(ops.routing_init(rngs.params(), H, num_clusters, qkv // H),
                                   **axes("heads", None, "head_dim"))

    def __call__(self, x: Float[Array, "B T C"], *, update: bool = False) -> Float[Array, "B T C"]:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [batch, seq, in_features={self.in_features}]; got {x.shape}")
        q, k, v = self.query(x), self.key(x), self.value(x)
        mu = self.centroids[...]
        y = ops.routing_attention(q, k, v, mu, window=self.window, is_causal=self.is_causal,
                                  implementation=self.implementation)
        if update:
            self.centroids[...] = ops.routing_update(mu, q, k, decay=self.decay)
        return self.out(y)
