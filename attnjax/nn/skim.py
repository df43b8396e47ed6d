"""Skim-Attention ("Skim-Attention: Learning to Focus via Document Layout", Nguyen et al., EMNLP
Findings 2021): attention weights from the 2-D layout alone, values from the text.

Letter legend: B batch, T tokens, H heads, D head dim, C text features, L layout features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from attnjax import _checks, masks, ops
from attnjax.masks import Mask
from attnjax.nn.attention import check_module_mask
from attnjax.nn.layers import projection_axes
from attnjax.nn.sharding import axes


def skim_mask(q: Float[Array, "B T H D"], k: Float[Array, "B T H D"], top_k: int) -> Mask:
    """Skim-attention as a mask for another model: each query keeps the ``top_k`` keys with the
    largest layout scores (per head; ties may keep more), as a dense mask (:func:`attnjax.masks.dense`)."""
    s = jnp.einsum("bthd,bshd->bhts", q, k)
    kth = jax.lax.top_k(s, top_k)[0][..., -1:]
    return masks.dense(jax.lax.stop_gradient(s >= kth))


class SkimAttention(nnx.Module):
    r"""Skim-Attention: ``A = softmax(Q_l K_l^T / sqrt(D))`` with ``Q_l = l W_Q``, ``K_l = l W_K``
    from layout embeddings only, applied to values from the text stream, ``O = A (X W_V) W_O``.

    The layout embedding of a token is the sum of embeddings of its box: ``x0``, ``x1`` share the
    x table, ``y0``, ``y1`` the y table, plus width and height tables (LayoutLM's 2-D position
    embedding); coordinates are integers in ``[0, num_coords)``. :meth:`layout_qk` can be computed
    once and passed to several layers (``qk=``), as the Skimformer does; :func:`skim_mask` turns it
    into a top-``k`` mask for another model.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.SkimAttention(2, 16, layout_features=8, rngs=nnx.Rngs(0))
    >>> boxes = jax.random.randint(jax.random.key(1), (1, 9, 4), 0, 1000)
    >>> m(jax.random.normal(jax.random.key(0), (1, 9, 16)), boxes).shape
    (1, 9, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        layout_features: int,
        num_coords: int = 1001,
        mask: Mask | None = None,
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, qkv = _checks.head_features(num_heads, in_features)
        L = _checks.positive_int("layout_features", layout_features)
        D = qkv // H
        self.in_features, self.num_coords = C, _checks.positive_int("num_coords", num_coords)
        self.mask, self.implementation = check_module_mask(mask), implementation
        emb = lambda: nnx.Embed(num_coords, L, embedding_metadata=axes(None, "embed"), rngs=rngs)
        self.x_embed, self.y_embed, self.w_embed, self.h_embed = emb(), emb(), emb(), emb()
        lin = lambda n_in, names: nnx.LinearGeneral(
            n_in, (H, D), use_bias=use_bias, dtype=dtype, rngs=rngs, **projection_axes(*names)
        )
        self.layout_query, self.layout_key = (
            lin(L, (None, "heads", "head_dim")),
            lin(L, (None, "heads", "head_dim")),
        )
        self.value = lin(C, ("embed", "heads", "head_dim"))
        self.out = nnx.LinearGeneral(
            (H, D),
            C,
            axis=(-2, -1),
            use_bias=use_bias,
            dtype=dtype,
            rngs=rngs,
            **projection_axes("heads", "head_dim", "embed", inputs=2),
        )

    def layout_embedding(self, boxes: Int[Array, "B T 4"]) -> Float[Array, "B T L"]:
        """``l = E_x(x0) + E_y(y0) + E_x(x1) + E_y(y1) + E_w(x1 - x0) + E_h(y1 - y0)``."""
        if boxes.ndim != 3 or boxes.shape[-1] != 4 or not jnp.issubdtype(boxes.dtype, jnp.integer):
            raise ValueError(
                f"boxes must be integer [batch, seq, 4] (x0, y0, x1, y1); got {boxes.dtype}{boxes.shape}"
            )
        b = jnp.clip(boxes, 0, self.num_coords - 1)
        x0, y0, x1, y1 = (b[..., i] for i in range(4))
        w, h = jnp.clip(x1 - x0, 0, self.num_coords - 1), jnp.clip(y1 - y0, 0, self.num_coords - 1)
        return (
            self.x_embed(x0)
            + self.y_embed(y0)
            + self.x_embed(x1)
            + self.y_embed(y1)
            + self.w_embed(w)
            + self.h_embed(h)
        )

    def layout_qk(self, boxes: Int[Array, "B T 4"]):
        """``(Q_l, K_l)`` ``[B, T, H, D]`` from the boxes alone (shareable across layers)."""
        lay = self.layout_embedding(boxes)
        return self.layout_query(lay), self.layout_key(lay)

    def __call__(self, x: Float[Array, "B T C"], boxes: Int[Array, "B T 4"] | None = None, *, qk=None):
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [batch, seq, in_features={self.in_features}]; got {x.shape}")
        if (boxes is None) == (qk is None):
            raise ValueError("pass exactly one of boxes and qk (the layout queries and keys of layout_qk)")
        q, k = self.layout_qk(boxes) if qk is None else qk
        return self.out(
            ops.attention(q, k, self.value(x), mask=self.mask, implementation=self.implementation)
        )
