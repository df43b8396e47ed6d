r"""Set Transformer blocks ("Set Transformer: A Framework for Attention-based
Permutation-Invariant Neural Networks", Lee et al., ICML 2019), as the official
juho-lee/set_transformer ``modules.py``:

.. math::

    \mathrm{MAB}(X, Y) = \mathrm{LN}_1(O + \mathrm{ReLU}(\mathrm{fc}_o(O))),\quad
    O = \mathrm{LN}_0\big(Q' + \mathrm{softmax}(Q' K'^\top / \sqrt{d_V}) V'\big)

with ``Q' = fc_q(X)``, ``K' = fc_k(Y)``, ``V' = fc_v(Y)`` split into heads
(:func:`attnjax.ops.mab_attention`), LayerNorms optional (``ln``). ``SAB(X) = MAB(X, X)``,
``ISAB_m(X) = MAB(X, MAB(I, X))`` with ``m`` learned inducing points (``O(n m)``),
``PMA_k(Z) = MAB(S, Z)`` with ``k`` learned seeds (the official code omits the paper's rFF).
Variable set sizes: pad and pass ``lengths [B]``; padded elements are masked as keys and change
nothing in the valid outputs.

Letter legend: B batch, n set size, m inducing points, k seeds, C features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from attnjax import _checks, ops
from attnjax.nn.sharding import layer_norm, linear, param


class MAB(nnx.Module):
    """The multihead attention block ``MAB(X, Y)`` (module docstring).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> mab = nn.MAB(3, 5, 8, 2, rngs=nnx.Rngs(0))
    >>> mab(jax.numpy.ones((1, 4, 3)), jax.numpy.ones((1, 6, 5))).shape
    (1, 4, 8)
    """

    def __init__(
        self,
        dim_q: int,
        dim_k: int,
        dim_v: int,
        num_heads: int,
        *,
        ln: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        for name, n in (("dim_q", dim_q), ("dim_k", dim_k), ("dim_v", dim_v), ("num_heads", num_heads)):
            _checks.positive_int(name, n)
        if dim_v % num_heads:
            raise ValueError(f"dim_v={dim_v} must be a multiple of num_heads={num_heads}")
        self.num_heads, self.dim_v, self.implementation = num_heads, dim_v, implementation
        kw = dict(dtype=dtype, rngs=rngs)
        self.fc_q = linear(dim_q, dim_v, ("embed", "heads"), **kw)
        self.fc_k = linear(dim_k, dim_v, ("embed", "heads"), **kw)
        self.fc_v = linear(dim_k, dim_v, ("embed", "heads"), **kw)
        self.fc_o = linear(dim_v, dim_v, (None, "embed"), **kw)
        self.ln0 = layer_norm(dim_v, **kw) if ln else None
        self.ln1 = layer_norm(dim_v, **kw) if ln else None

    def heads(self, x: Array) -> Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.dim_v // self.num_heads)

    def __call__(
        self,
        x: Float[Array, "B T Cq"],
        y: Float[Array, "B S Ck"],
        key_lengths: Int[Array, " B"] | None = None,
    ) -> Float[Array, "B T C"]:
        if x.ndim != 3 or y.ndim != 3 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x and y must be [batch, len, features] with one batch; got {x.shape} and {y.shape}"
            )
        q, k, v = self.heads(self.fc_q(x)), self.heads(self.fc_k(y)), self.heads(self.fc_v(y))
        o = ops.mab_attention(q, k, v, key_lengths=key_lengths, implementation=self.implementation)
        o = o.reshape(*x.shape[:2], self.dim_v)
        o = o if self.ln0 is None else self.ln0(o)
        o = o + jax.nn.relu(self.fc_o(o))
        return o if self.ln1 is None else self.ln1(o)


class SAB(nnx.Module):
    """Set attention block ``SAB(X) = MAB(X, X)``: permutation-equivariant, ``O(n^2)``."""

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        num_heads: int,
        *,
        ln: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.mab = MAB(
            dim_in, dim_in, dim_out, num_heads, ln=ln, implementation=implementation, dtype=dtype, rngs=rngs
        )

    def __call__(
        self, x: Float[Array, "B n C"], lengths: Int[Array, " B"] | None = None
    ) -> Float[Array, "B n Co"]:
        return self.mab(x, x, lengths)


class ISAB(nnx.Module):
    """Induced set attention block ``ISAB_m(X) = MAB(X, MAB(I, X))``: permutation-equivariant,
    ``O(n m)`` with ``m = num_inds`` learned inducing points."""

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        num_heads: int,
        num_inds: int,
        *,
        ln: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        m = _checks.positive_int("num_inds", num_inds)
        init = nnx.initializers.xavier_uniform()
        self.inducing = param(init(rngs.params(), (1, m, dim_out), dtype or jnp.float32), None, None, "embed")
        kw = dict(ln=ln, implementation=implementation, dtype=dtype, rngs=rngs)
        self.mab0 = MAB(dim_out, dim_in, dim_out, num_heads, **kw)
        self.mab1 = MAB(dim_in, dim_out, dim_out, num_heads, **kw)

    def __call__(
        self, x: Float[Array, "B n C"], lengths: Int[Array, " B"] | None = None
    ) -> Float[Array, "B n Co"]:
        ind = jnp.broadcast_to(self.inducing[...], (x.shape[0], *self.inducing.shape[1:]))
        return self.mab1(x, self.mab0(ind, x, lengths))


class PMA(nnx.Module):
    """Pooling by multihead attention ``PMA_k(Z) = MAB(S, Z)`` with ``k = num_seeds`` learned
    seeds: permutation-invariant, ``[B, n, C] -> [B, k, C]``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_seeds: int,
        *,
        ln: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        k = _checks.positive_int("num_seeds", num_seeds)
        init = nnx.initializers.xavier_uniform()
        self.seeds = param(init(rngs.params(), (1, k, dim), dtype or jnp.float32), None, None, "embed")
        self.mab = MAB(dim, dim, dim, num_heads, ln=ln, implementation=implementation, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: Float[Array, "B n C"], lengths: Int[Array, " B"] | None = None
    ) -> Float[Array, "B k C"]:
        seeds = jnp.broadcast_to(self.seeds[...], (x.shape[0], *self.seeds.shape[1:]))
        return self.mab(seeds, x, lengths)
