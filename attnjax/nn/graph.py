r"""Graph attention layers (GAT, GATv2) on :func:`attnjax.ops.gat_attention` /
:func:`attnjax.ops.gatv2_attention`.

``h [B, N, C]`` node features, ``adjacency`` an :mod:`attnjax.masks` mask or a boolean
``[B|1, N, N]`` array (receiver ``i``, sender ``j``; include self-loops). Output ``[B, N, H E]``
(heads concatenated) or ``[B, N, E]`` (averaged, GAT's last layer); the paper's non-linearity
``sigma`` is left to the caller.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from attnjax import _checks, masks, ops
from attnjax.nn.sharding import linear, param


class GraphAttention(nnx.Module):
    """One GAT (``version=1``) or GATv2 (``version=2``) layer.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> layer = nn.GraphAttention(6, 4, 2, rngs=nnx.Rngs(0))
    >>> adj = jnp.eye(5, dtype=bool) | jnp.eye(5, k=1, dtype=bool)
    >>> layer(jnp.ones((1, 5, 6)), adj[None]).shape
    (1, 5, 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_heads: int,
        *,
        version: int = 1,
        concat: bool = True,
        negative_slope: float = 0.2,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        C, E, H = (
            _checks.positive_int(n, x)
            for n, x in (
                ("in_features", in_features),
                ("out_features", out_features),
                ("num_heads", num_heads),
            )
        )
        if version not in (1, 2):
            raise ValueError(f"version must be 1 (GAT) or 2 (GATv2); got {version!r}")
        self.heads, self.features, self.version, self.concat = H, E, version, concat
        self.negative_slope, self.implementation = negative_slope, implementation
        kw = dict(use_bias=False, dtype=dtype, rngs=rngs)
        init = nnx.initializers.glorot_uniform()
        self.w = linear(C, H * E, ("embed", "heads"), **kw)
        if version == 1:
            self.a_dst = param(init(rngs.params(), (H, E), dtype or jnp.float32), "heads", None)
            self.a_src = param(init(rngs.params(), (H, E), dtype or jnp.float32), "heads", None)
        else:  # GATv2: W [h_i || h_j] = W_l h_i + W_r h_j, with w the value/sender projection
            self.w_dst = linear(C, H * E, ("embed", "heads"), **kw)
            self.a = param(init(rngs.params(), (H, E), dtype or jnp.float32), "heads", None)

    def __call__(self, h: Float[Array, "B N C"], adjacency: masks.Mask | Bool[Array, "#B N N"] | None = None):
        if h.ndim != 3:
            raise ValueError(f"h must be [batch, nodes, features]; got {h.shape}")
        B, N, _ = h.shape
        if adjacency is not None and not isinstance(adjacency, masks.Mask):
            adjacency = jnp.asarray(adjacency)
            if adjacency.ndim != 3 or adjacency.shape[1:] != (N, N):
                raise ValueError(f"adjacency must be [batch|1, nodes={N}, nodes={N}]; got {adjacency.shape}")
            adjacency = masks.dense(adjacency[:, None])
        split = lambda x: x.reshape(B, N, self.heads, self.features)
        wh = split(self.w(h))
        kw = dict(negative_slope=self.negative_slope, implementation=self.implementation)
        if self.version == 1:
            u = jnp.einsum("bnhe,he->bnh", wh, self.a_dst[...].astype(wh.dtype))
            w = jnp.einsum("bnhe,he->bnh", wh, self.a_src[...].astype(wh.dtype))
            out = ops.gat_attention(u, w, wh, adjacency, **kw)
        else:
            out = ops.gatv2_attention(
                split(self.w_dst(h)), wh, wh, self.a[...].astype(wh.dtype), adjacency, **kw
            )
        return out.reshape(B, N, -1) if self.concat else out.mean(2)
