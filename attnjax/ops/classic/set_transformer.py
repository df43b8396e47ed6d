r"""The Set Transformer's multihead attention block core ("Set Transformer: A Framework for
Attention-based Permutation-Invariant Neural Networks", Lee et al., ICML 2019;
juho-lee/set_transformer ``modules.py``).

.. math::

    O = Q' + \mathrm{softmax}\big(Q'_h K'^\top_h / \sqrt{d_V}\big) V'_h

per head ``h``, with the logits scaled by the *full* model width ``d_V = H E`` (not the head dim,
as the official code) and a residual with the projected queries (no output projection). Sets of
different sizes are padded and the padded elements masked as keys (``key_lengths``), so they change
nothing. The NNX blocks ``MAB``, ``SAB``, ``ISAB`` and ``PMA`` (:mod:`attnjax.nn.set_transformer`)
wrap this with projections, LayerNorms and the ``rFF`` residual.

Letter legend: B batch, T queries (set elements or seeds), S keys, H heads, E head dim.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attnjax import _checks, masks
from attnjax.core.blocks import BlockSizes
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention


def mab_attention(
    q: Float[Array, "B T H E"],
    k: Float[Array, "B S H E"],
    v: Float[Array, "B S H E"],
    *,
    key_lengths: Int[Array, " B"] | None = None,
    query_lengths: Int[Array, " B"] | None = None,
    implementation: Implementation = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T H E"]:
    r"""``q + softmax(q k^T / sqrt(H E)) v`` (module docstring), keys past ``key_lengths[b]``
    masked (a query row with no key keeps ``q``); with ``query_lengths`` the padded query rows
    get ``q`` alone as well.

    >>> import jax.numpy as jnp
    >>> q = jnp.zeros((1, 1, 1, 2)); k = jnp.zeros((1, 3, 1, 2))
    >>> v = jnp.arange(6.0).reshape(1, 3, 1, 2)
    >>> mab_attention(q, k, v, key_lengths=jnp.array([2]))[0, 0, 0]   # mean of the first two
    Array([1., 2.], dtype=float32)
    """
    _, _, S, H, _, D, E = _checks.check_qkv(q, k, v)
    if D != E:
        raise ValueError(
            f"the MAB residual adds q to the attention output: q's head dim {D} must equal v's {E}"
        )
    mask = None
    if key_lengths is not None or query_lengths is not None:
        mask = masks.padding(S if key_lengths is None else key_lengths, query_lengths)
    out = attention(
        q,
        k,
        v,
        mask=mask,
        scale=1.0 / math.sqrt(H * E),
        implementation=implementation,
        block_sizes=block_sizes,
    )
    return (q.astype(jnp.float32) + out.astype(jnp.float32)).astype(q.dtype)
