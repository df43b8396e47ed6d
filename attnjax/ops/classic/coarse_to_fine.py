r"""Coarse-to-fine attention ("Image-to-Markup Generation with Coarse-to-Fine Attention", Deng
et al., ICML 2017; harvardnlp/im2markup).

Fine features are grouped into support regions (cells, e.g. 4x4 patches of the feature grid); a
coarse attention ``alpha'`` over cells (softmax, or :func:`sparsemax` for a sparse choice) mixes
fine attentions restricted to each cell:

.. math::

    \alpha_{ij} = \alpha'_{c(j)}\, \mathrm{softmax}_{j' \in c(j)}(s_{ij'}), \qquad
    O_i = \sum_c \alpha'_c\, O_{i,c}.

With the keys laid out cell by cell (``cell_size`` contiguous keys per cell,
:func:`grid_cells`), the per-cell attentions are one ``ops.attention`` call with the cells
folded into the batch (``O(T S)`` work, ``O(T C E)`` memory for the per-cell outputs), mixed by
``alpha'`` (C5: partial attentions over disjoint key sets). Hard selection of one cell per query
(REINFORCE in the paper) is a document mask: query ``i`` sees the keys of cell ``cell_index[i]``
only, :func:`coarse_to_fine_hard`.

Letter legend: B batch, T queries, S = C * cell_size keys, C cells, H heads, D head dim, E value dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attnjax import _checks, masks
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention


def sparsemax(z: Float[Array, "*N C"]) -> Float[Array, "*N C"]:
    """Sparsemax (Martins and Astudillo, 2016) over the last axis: the Euclidean projection of
    ``z`` onto the simplex (sparse weights summing to 1).

    >>> import jax.numpy as jnp
    >>> sparsemax(jnp.array([2.0, 1.0, -1.0])).tolist()
    [1.0, 0.0, 0.0]
    """
    z = z.astype(jnp.float32)
    srt = -jnp.sort(-z, -1)
    n = jnp.arange(1, z.shape[-1] + 1, dtype=jnp.float32)
    cum = jnp.cumsum(srt, -1)
    support = 1 + n * srt > cum
    k = support.sum(-1, keepdims=True)
    tau = (jnp.take_along_axis(cum, k - 1, -1) - 1) / k
    return jnp.maximum(z - tau, 0.0)


def grid_cells(x: Float[Array, "B h w ..."], cell: tuple[int, int]) -> Float[Array, "B S ..."]:
    """Lays a ``[B, h, w, ...]`` feature grid out cell by cell (``cell = (a, b)`` patches, row
    major): ``[B, (h / a) (w / b) a b, ...]``, so cell ``c`` holds keys ``c a b .. (c + 1) a b - 1``."""
    B, h, w = x.shape[:3]
    a, b = cell
    if h % a or w % b:
        raise ValueError(f"the grid {(h, w)} must be a multiple of the cell {cell}")
    rest = x.shape[3:]
    y = x.reshape(B, h // a, a, w // b, b, *rest).swapaxes(2, 3)
    return y.reshape(B, h * w, *rest)


def coarse_to_fine_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    coarse: Float[Array, "B T H C"],
    cell_size: int,
    *,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    r"""``sum_c coarse[..., c] * attention(q, k_c, v_c)`` with ``k_c``, ``v_c`` the ``cell_size``
    keys of cell ``c`` (module docstring). ``coarse``: the coarse weights ``alpha'`` (softmax or
    :func:`sparsemax` of the coarse logits; they get gradients).

    ``implementation``: ``"reference"`` (the dense hierarchical weights ``alpha_ij``) or ``"xla"``
    (the cells folded into the batch of one blockwise ``ops.attention``).
    """
    B, T, S, H, K, D, E = _checks.check_qkv(q, k, v)
    cs = _checks.positive_int("cell_size", cell_size)
    if S % cs:
        raise ValueError(f"kv_len={S} must be a multiple of cell_size={cs}")
    C = S // cs
    if jnp.shape(coarse) != (B, T, H, C):
        raise ValueError(
            f"coarse must be [batch={B}, q_len={T}, heads={H}, cells={C}]; got {jnp.shape(coarse)}"
        )
    scale = D**-0.5 if scale is None else scale
    a = coarse.astype(jnp.float32)

    def reference():
        kr = jnp.repeat(k.astype(jnp.float32), H // K, 2).reshape(B, C, cs, H, D)
        vr = jnp.repeat(v.astype(jnp.float32), H // K, 2).reshape(B, C, cs, H, E)
        s = jnp.einsum("bthd,bcshd->bthcs", q.astype(jnp.float32), kr, precision="highest") * scale
        fine = jnp.exp(s - s.max(-1, keepdims=True))
        fine = fine / fine.sum(-1, keepdims=True)
        alpha = a[..., None] * fine  # [B, T, H, C, cs]: the hierarchical weights
        return jnp.einsum("bthcs,bcshe->bthe", alpha, vr, precision="highest").astype(v.dtype)

    def xla():
        fold = lambda x: x.reshape(B * C, cs, *x.shape[2:])
        qb = jnp.broadcast_to(q[:, None], (B, C, T, H, D)).reshape(B * C, T, H, D)
        out = attention(qb, fold(k), fold(v), scale=scale, implementation="xla")  # [B C, T, H, E]
        out = out.reshape(B, C, T, H, E).astype(jnp.float32)
        return jnp.einsum("bthc,bcthe->bthe", a, out, precision="highest").astype(v.dtype)

    return dispatch.run("coarse_to_fine_attention", {"reference": reference, "xla": xla}, implementation)


def coarse_to_fine_hard(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    cell_index: Int[Array, "B T"],
    cell_size: int,
    **kwargs,
) -> Float[Array, "B T H E"]:
    """Hard coarse-to-fine attention: query ``i`` attends only to the keys of cell
    ``cell_index[b, i]`` (selected or sampled by the caller, e.g. :func:`attnjax.ops.hard_attention`
    on the coarse logits): a document mask on cell ids, blockwise (``kwargs`` go to
    :func:`attnjax.ops.attention`)."""
    B, T, S, _, _, _, _ = _checks.check_qkv(q, k, v)
    cs = _checks.positive_int("cell_size", cell_size)
    if S % cs:
        raise ValueError(f"kv_len={S} must be a multiple of cell_size={cs}")
    kv_cells = jnp.broadcast_to(jnp.arange(S) // cs, (B, S)).astype(jnp.int32)
    return attention(q, k, v, mask=masks.document(jnp.asarray(cell_index, jnp.int32), kv_cells), **kwargs)
