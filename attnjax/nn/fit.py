r"""FIT: far-reaching interleaved transformer blocks ("FIT: Far-reaching Interleaved
Transformers", Chen and Li, 2023; a reading of the paper's method).

``L`` data tokens are cut into ``G = L / n`` groups of ``n``; each group owns ``m`` latent tokens.
One block (pre-norm, residual):

1. local: self-attention over each group's data tokens (groups folded into the batch);
2. read: each group's latents attend over ``[latents; group data]``;
3. global: self-attention over all ``G m`` latents (``causal_groups``: latents see the latents of
   their own and earlier groups, for autoregression);
4. write: each group's data tokens attend over their group's latents.

Cost ``O(L n + (L m / n)^2)``. Data of group ``g`` depends on other groups only through the
global latent layer (without it, not at all). Every attention is
:class:`attnjax.nn.MultiHeadAttention`.

Letter legend: B batch, L data tokens, G groups, n group size, m latents per group, C features.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, masks
from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.sharding import layer_norm


class FITBlock(nnx.Module):
    """One FIT block on ``(x [B, L, C], z [B, G, m, C])`` -> the same shapes.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> block = nn.FITBlock(8, 2, group_size=3, rngs=nnx.Rngs(0))
    >>> x, z = block(jnp.ones((1, 6, 8)), jnp.ones((1, 2, 2, 8)))
    >>> x.shape, z.shape
    ((1, 6, 8), (1, 2, 2, 8))
    """

    def __init__(
        self,
        features: int,
        num_heads: int,
        *,
        group_size: int,
        global_layer: bool = True,
        causal_groups: bool = False,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        C = _checks.positive_int("features", features)
        self.group_size = _checks.positive_int("group_size", group_size)
        self.causal_groups = causal_groups
        attn = lambda: MultiHeadAttention(num_heads, C, dtype=dtype, rngs=rngs)
        norm = lambda: layer_norm(C, dtype=dtype, rngs=rngs)
        self.local, self.read, self.write = attn(), attn(), attn()
        self.glob = attn() if global_layer else None
        self.norm_local, self.norm_read_q, self.norm_read_kv = norm(), norm(), norm()
        self.norm_glob = norm() if global_layer else None
        self.norm_write_q, self.norm_write_kv = norm(), norm()

    def __call__(self, x: Float[Array, "B L C"], z: Float[Array, "B G m C"]):
        if x.ndim != 3 or z.ndim != 4:
            raise ValueError(
                f"x must be [batch, L, C] and z [batch, groups, m, C]; got {x.shape} and {z.shape}"
            )
        B, L, C = x.shape
        n = self.group_size
        if L % n or z.shape[0] != B or z.shape[1] != L // n or z.shape[3] != C:
            raise ValueError(
                f"L={L} must be a multiple of group_size={n} and z [batch={B}, groups={L // n}, m, "
                f"C={C}]; got z {z.shape}"
            )
        G, m = z.shape[1], z.shape[2]
        xg = x.reshape(B * G, n, C)
        zg = z.reshape(B * G, m, C)
        h = self.norm_local(xg)
        xg = xg + self.local(h)
        ctx = self.norm_read_kv(jnp.concatenate([zg, xg], 1))
        zg = zg + self.read(self.norm_read_q(zg), ctx)
        if self.glob is not None:
            zf = zg.reshape(B, G * m, C)
            # block-causal over groups: latent i (group i // m) sees the groups up to its own
            mask = masks.from_fn(lambda b, h_, i, j: j // m <= i // m) if self.causal_groups else None
            zf = zf + self.glob(self.norm_glob(zf), mask=mask)
            zg = zf.reshape(B * G, m, C)
        xg = xg + self.write(self.norm_write_q(xg), self.norm_write_kv(zg))
        return xg.reshape(B, L, C), zg.reshape(B, G, m, C)
