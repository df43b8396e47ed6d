"""The mixture-of-head attention module of "MoH: Multi-Head Attention as Mixture-of-Head
Attention" (Jin et al., 2024).

Letter legend: B batch, T tokens, H heads, D head dim, C features.
"""

from __future__ import annotations

from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, ops
from attnjax.masks import Mask
from attnjax.nn.attention import check_module_mask, combine_masks
from attnjax.nn.layers import head_projections
from attnjax.nn.sharding import linear


class MoHAttention(nnx.Module):
    r"""Multi-head attention whose heads are routed per token (see :func:`attnjax.ops.moh_attention`).

    .. math::

        y_t = \sum_h g_{t,h}\, \mathrm{Attn}_h(x W_Q, x W_K, x W_V)_t\, W_O^h

    with gates from three linear routers of ``x``: over the ``num_shared_heads`` shared heads
    (``W_s``), over the routed heads (``W_r``, top ``top_k`` kept), and the two-way balance
    ``W_h``. Returns ``(y, aux_loss)``: add ``aux_weight * aux_loss`` (the paper: 0.01) to the
    training loss to balance the routed heads.

    ``convention="official"`` computes the gates and the loss as the released MoH code does
    (renormalized top-k gates scaled by ``top_k``, shared gates by ``num_shared_heads``, the
    balance by 2, the loss by ``H_r``; :func:`attnjax.ops.moh_attention`), to run its
    checkpoints; ``"paper"`` (default) follows the paper's equations. Official weights map as
    ``wg -> routed_router``, ``wg_1 -> shared_router``, ``wg_0 -> mix_router`` (transposed,
    torch ``Linear`` stores ``[out, in]``).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import masks, nn
    >>> m = nn.MoHAttention(8, 32, num_shared_heads=2, top_k=3, mask=masks.causal(), rngs=nnx.Rngs(0))
    >>> y, aux = m(jax.random.normal(jax.random.key(0), (2, 12, 32)))
    >>> y.shape, aux.shape
    ((2, 12, 32), ())
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        num_shared_heads: int,
        top_k: int,
        qkv_features: int | None = None,
        mask: Mask | None = None,
        skip_unselected: bool = False,
        block_q: int = 64,
        convention: str = "paper",
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, qkv = _checks.head_features(num_heads, in_features, qkv_features)
        hs = _checks.positive_int("num_shared_heads", num_shared_heads, allow_zero=True)
        if hs >= H:
            raise ValueError(f"num_shared_heads={hs} must be < num_heads={H} (at least one routed head)")
        self.top_k = _checks.positive_int("top_k", top_k)
        if self.top_k > H - hs:
            raise ValueError(f"top_k={top_k} must be <= the {H - hs} routed heads")
        self.num_heads, self.num_shared_heads, self.head_dim, self.in_features = H, hs, qkv // H, C
        self.mask, self.skip_unselected, self.block_q = check_module_mask(mask), skip_unselected, block_q
        self.implementation = implementation
        self.convention = _checks.convention(convention)
        self.query, self.key, self.value, self.out = head_projections(
            C, H, qkv // H, use_bias=use_bias, dtype=dtype, rngs=rngs)
        router = lambda n: linear(C, n, ("embed", None), use_bias=False, dtype=dtype, rngs=rngs)
        self.routed_router = router(H - hs)
        self.shared_router = router(hs) if hs else nnx.data(None)
        self.mix_router = router(2) if hs else nnx.data(None)

    def router_logits(self, x: Float[Array, "B T C"]):
        """``(routed_logits, shared_logits, mix_logits)`` (the last two None without shared heads)."""
        shared = None if self.shared_router is None else self.shared_router(x)
        mix = None if self.mix_router is None else self.mix_router(x)
        return self.routed_router(x), shared, mix

    def __call__(self, x: Float[Array, "B T C"], *, mask: Mask | None = None):
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [batch, seq, in_features={self.in_features}]; got {x.shape}")
        q, k, v = self.query(x), self.key(x), self.value(x)
        routed, shared, mix = self.router_logits(x)
        res = ops.moh_attention(
            q, k, v, routed, top_k=self.top_k, shared_logits=shared, mix_logits=mix,
            mask=combine_masks(self.mask, mask), skip_unselected=self.skip_unselected,
            block_q=self.block_q, convention=self.convention, implementation=self.implementation,
        )
        return self.out(res.out), res.aux_loss
