"""SHRP: expert-attention head routing and pruning ("SHRP: Specialized Head Routing and Pruning for
Efficient Encoder Compression", 2025; a reading of the abstract).

Letter legend: B batch, T tokens, H heads, D head dim, C features.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, ops
from attnjax.masks import Mask
from attnjax.nn.attention import check_module_mask
from attnjax.nn.layers import projection_axes
from attnjax.nn.sharding import linear


class HeadUsage(nnx.Variable):
    """How many tokens each head has served (a statistic, not a parameter)."""


class SHRPAttention(nnx.Module):
    r"""Heads as experts with top-1 routing, a shared expander, usage statistics and pruning.

    Each token goes to one head, chosen by a linear router (:func:`attnjax.ops.moh_attention` with
    ``top_k=1``, no shared heads, ``convention="official"``: the chosen head's gate is exactly 1,
    so the output does not depend on the other heads' router logits). The chosen head's output
    passes an expander MLP shared by all heads (``D -> hidden -> C``). While ``track_usage`` is
    on, :attr:`usage` counts the tokens each head served; :meth:`prune` then keeps the heads you
    name (e.g. ``usage > threshold``) and gives an identical layer for every token that never chose a
    dropped head.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.SHRPAttention(4, 16, rngs=nnx.Rngs(0))
    >>> y = m(jax.random.normal(jax.random.key(0), (2, 9, 16)))
    >>> y.shape, int(m.usage[...].sum())
    ((2, 9, 16), 18)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        head_dim: int | None = None,
        expander_hidden: int | None = None,
        mask: Mask | None = None,
        track_usage: bool = True,
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, qkv = _checks.head_features(num_heads, in_features)
        D = _checks.positive_int("head_dim", head_dim or qkv // H)
        hidden = _checks.positive_int("expander_hidden", expander_hidden or 2 * C)
        self.in_features, self.num_heads, self.head_dim = C, H, D
        self.mask, self.track_usage, self.implementation = (
            check_module_mask(mask),
            track_usage,
            implementation,
        )
        lin = lambda: nnx.LinearGeneral(
            C,
            (H, D),
            use_bias=use_bias,
            dtype=dtype,
            rngs=rngs,
            **projection_axes("embed", "heads", "head_dim"),
        )
        self.query, self.key, self.value = lin(), lin(), lin()
        self.router = linear(C, H, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.expand1 = linear(D, hidden, ("head_dim", "mlp"), dtype=dtype, rngs=rngs)
        self.expand2 = linear(hidden, C, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.usage = HeadUsage(jnp.zeros((H,), jnp.float32))

    def routed(self, x: Float[Array, "B T C"]) -> ops.MoHOutput:
        """The top-1 routed heads' gated outputs (:class:`attnjax.ops.MoHOutput`)."""
        return ops.moh_attention(
            self.query(x),
            self.key(x),
            self.value(x),
            self.router(x),
            top_k=1,
            mask=self.mask,
            convention="official",
            implementation=self.implementation,
        )

    def expander(self, o: Float[Array, "B T D"]) -> Float[Array, "B T C"]:
        return self.expand2(jax.nn.gelu(self.expand1(o)))

    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [batch, seq, in_features={self.in_features}]; got {x.shape}")
        res = self.routed(x)
        if self.track_usage:
            self.usage[...] = self.usage[...] + jax.lax.stop_gradient(
                (res.gates > 0).sum((0, 1)).astype(jnp.float32)
            )
        return self.expander(res.out.sum(2))  # one head per token: the sum is the chosen head's output

    def prune(self, keep: Sequence[int]) -> SHRPAttention:
        """A copy holding only the heads ``keep`` (their projections, router columns and usage)."""
        keep = sorted({int(h) for h in keep})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_heads:
            raise ValueError(f"keep must name at least one head in [0, {self.num_heads}); got {keep}")
        new = nnx.clone(self)
        idx = jnp.asarray(keep)
        take = lambda var, axis: var.set_value(jnp.take(var.get_value(), idx, axis=axis))  # shapes change
        for proj in (new.query, new.key, new.value):
            take(proj.kernel, 1)
            if proj.bias is not None:
                take(proj.bias, 0)
        take(new.router.kernel, 1)
        if new.router.bias is not None:
            take(new.router.bias, 0)
        take(new.usage, 0)
        new.num_heads = len(keep)
        return new
