"""A transformer block (attention + MLP) with pre-norm or Hybrid-Norm residuals."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx
from jaxtyping import Array, Float

from attnjax import ops
from attnjax.masks import Mask
from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.layers import LayerScale, Mlp
from attnjax.nn.sharding import layer_norm

NORMS = ("pre", "hybrid")


class TransformerBlock(nnx.Module):
    r"""Attention then MLP, each a residual branch ``x + f(x)`` normalized one of two ways.

    * ``norm="pre"``: :math:`x + f(\mathrm{LN}_1(x))` (GPT-2 / ViT pre-norm);
    * ``norm="hybrid"``: :math:`x + \mathrm{LN}_2(f(\mathrm{LN}_1(x)))`, the branch output is
      normalized too before it joins the residual stream (the "Hybrid-Norm"/sandwich form:
      pre-norm's stable gradients with a bounded update from each branch), for both the
      attention and the MLP branch.

    ``layer_scale`` (a small float, e.g. ``1e-5``) multiplies each branch by a learned
    per-feature :class:`LayerScale` before the residual add.

    ``attention`` is any module ``(x, ...) -> y`` (``MultiHeadAttention``, ``AgentAttention``,
    ``MoHAttention``); by default a :class:`MultiHeadAttention` built from ``num_heads``,
    ``attention_fn``, ``mask``, ``num_kv_heads`` and ``qk_norm``. If the attention returns
    ``(y, aux_loss)`` (``MoHAttention``), the block returns ``(out, aux_loss)`` too, so the loss
    reaches the training objective explicitly (no sown state to collect).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import masks, nn
    >>> block = nn.TransformerBlock(32, 4, norm="hybrid", mask=masks.causal(), rngs=nnx.Rngs(0))
    >>> block(jax.random.normal(jax.random.key(0), (2, 9, 32))).shape
    (2, 9, 32)
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        attention: nnx.Module | None = None,
        attention_fn: Callable[..., Array] = ops.attention,
        mask: Mask | None = None,
        num_kv_heads: int | None = None,
        qk_norm: bool = False,
        mlp_ratio: float = 4.0,
        norm: str = "pre",
        layer_scale: float | None = None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
        self.norm = norm
        if attention is None:
            attention = MultiHeadAttention(
                num_heads, in_features, num_kv_heads=num_kv_heads, attention_fn=attention_fn, mask=mask,
                qk_norm=qk_norm, use_bias=False, dtype=dtype, rngs=rngs,
            )
        self.attention = attention
        self.mlp = Mlp(in_features, ratio=mlp_ratio, dtype=dtype, rngs=rngs)
        ln = lambda: layer_norm(in_features, dtype=dtype, rngs=rngs)
        self.attn_in_norm, self.mlp_in_norm = ln(), ln()
        hybrid = norm == "hybrid"
        self.attn_out_norm = ln() if hybrid else nnx.data(None)
        self.mlp_out_norm = ln() if hybrid else nnx.data(None)
        scale = (lambda: LayerScale(in_features, init_value=layer_scale)) if layer_scale is not None else None
        self.attn_scale = scale() if scale else nnx.data(None)
        self.mlp_scale = scale() if scale else nnx.data(None)

    def __call__(self, x: Float[Array, "B T C"], **attention_kwargs):
        """``attention_kwargs`` (``mask=``, ``decode=``, ...) go to the attention module.

        Returns ``[B, T, C]``, or ``([B, T, C], aux_loss)`` if the attention returns a pair."""
        y = self.attention(self.attn_in_norm(x), **attention_kwargs)
        aux = None
        if isinstance(y, tuple):
            y, aux = y
        x = x + self._branch_out(y, self.attn_out_norm, self.attn_scale)
        y = self.mlp(self.mlp_in_norm(x))
        out = x + self._branch_out(y, self.mlp_out_norm, self.mlp_scale)
        return out if aux is None else (out, aux)

    @staticmethod
    def _branch_out(y, out_norm, scale):
        if out_norm is not None:
            y = out_norm(y)
        if scale is not None:
            y = scale(y)
        return y
