r"""Multi-scale deformable attention ("Deformable DETR", Zhu et al., ICLR 2021, arXiv 2010.04159).

Each query attends to a few sampled points per level instead of to every pixel: with value maps
``x^l`` (``L`` levels of ``h_l x w_l`` pixels), heads ``M`` and ``K`` points per level and head,

.. math::

    \mathrm{out}_{q,m} = \sum_{l=1}^{L} \sum_{k=1}^{K} A_{q m l k}\;
        \mathrm{bilinear}\big(x^l_m,\ p_{q m l k}\big),
    \qquad A_{q m \cdot \cdot} = \mathrm{softmax}_{(l, k)}(\mathrm{logits}_{q m \cdot \cdot})

where ``p`` are normalized locations in ``[0, 1]^2`` (``(x, y)``, the pixel grid's outer edges at
0 and 1: ``grid_sample(2 p - 1, align_corners=False)``, zero padding, as the official
``ms_deform_attn_core_pytorch``). There are no ``q . k`` scores: the query's linear layers
predict the locations and logits (:class:`attnjax.nn.MSDeformableAttention`).

The efficient path gathers four corners per point with :func:`attnjax.ops.bilinear_gather`
(``O(T M L K E)``); the reference scatters the bilinear corner weights times ``A`` into a
sparse-as-dense ``[T, sum_l h_l w_l]`` matrix and multiplies it with the values
(``O(T M sum_l h_l w_l E)``), exact and differentiable in values, locations and logits.

Letter legend: B batch, T queries, M heads, L levels, K points, E value dim per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.vision.sampling import bilinear_gather, dense_weights, to_pixels


def _check_shapes(shapes) -> tuple[tuple[int, int], ...]:
    try:
        out = tuple((int(a), int(b)) for a, b in shapes)
    except (TypeError, ValueError):
        raise ValueError(
            f"shapes must be a sequence of (height, width) pairs of ints; got {shapes!r}"
        ) from None
    if not out or any(a < 1 or b < 1 for a, b in out):
        raise ValueError(
            f"shapes must be a non-empty sequence of positive (height, width) pairs; got {shapes!r}"
        )
    return out


def deformable_attention(
    values: Float[Array, "B N M E"],
    shapes,
    locations: Float[Array, "B T M L K 2"],
    logits: Float[Array, "B T M L K"],
    *,
    implementation: Implementation = None,
) -> Float[Array, "B T M E"]:
    r"""Multi-scale deformable attention (see the module docstring for the equation).

    Args:
      values: the flattened value maps of every level, ``[B, N, M, E]`` with
        ``N = sum_l h_l w_l`` (level after level, each row-major), already split into heads.
      shapes: ``L`` static ``(h_l, w_l)`` pairs.
      locations: sampling points ``[B, T, M, L, K, 2]``, ``(x, y)`` normalized to ``[0, 1]``.
      logits: ``[B, T, M, L, K]``; softmax over the ``L K`` points of each query and head.
      implementation: ``"xla"`` (gather, ``O(T M L K E)``), ``"reference"`` (dense
        sparse-as-dense matrix), ``None`` or a sequence.

    Returns ``[B, T, M, E]`` in ``values``' dtype (float32 arithmetic).

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> v = jnp.arange(12.0).reshape(1, 12, 1, 1)              # one 3 x 4 level
    >>> loc = jnp.array([2.5 / 4, 1.5 / 3]).reshape(1, 1, 1, 1, 1, 2)  # the centre of pixel (1, 2)
    >>> ops.deformable_attention(v, [(3, 4)], loc, jnp.zeros((1, 1, 1, 1, 1)))[..., 0]
    Array([[[6.]]], dtype=float32)
    """
    B, N, M, E = _checks.check_rank("values", values, ("batch", "pixels", "heads", "head_dim"))
    _checks.check_float("values", values)
    shapes = _check_shapes(shapes)
    L = len(shapes)
    if sum(h * w for h, w in shapes) != N:
        raise ValueError(f"values has {N} pixels but shapes {shapes} hold {sum(h * w for h, w in shapes)}")
    lshape = _checks.check_rank(
        "locations", locations, ("batch", "queries", "heads", "levels", "points", "2")
    )
    T, K = lshape[1], lshape[4]
    if lshape != (B, T, M, L, K, 2):
        raise ValueError(f"locations has shape {lshape}; expected [B={B}, T, M={M}, L={L}, K, 2]")
    if _checks.check_rank("logits", logits, ("batch", "queries", "heads", "levels", "points")) != lshape[:-1]:
        raise ValueError(
            f"logits has shape {logits.shape}; expected {lshape[:-1]} (locations without the last axis)"
        )
    _checks.check_float("locations", locations)
    _checks.check_float("logits", logits)

    weights = jax.nn.softmax(logits.astype(jnp.float32).reshape(B, T, M, L * K), -1).reshape(B, T, M, L, K)
    weights = weights.transpose(0, 2, 3, 1, 4).reshape(B * M, L, T, K)  # [B M, L, T, K]
    locs = locations.transpose(0, 2, 3, 1, 4, 5).reshape(B * M, L, T, K, 2)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    heads_first = values.transpose(0, 2, 1, 3).reshape(B * M, N, E)

    def reference():
        rows = []
        for l, (h, w) in enumerate(shapes):
            x, y = to_pixels(2 * locs[:, l] - 1, h, w, align_corners=False, normalized=True, padding="zeros")
            dense = dense_weights(x, y, h, w)  # [B M, T, K, h w]
            rows.append(
                jnp.einsum("ntk,ntkp->ntp", weights[:, l], dense, precision=jax.lax.Precision.HIGHEST)
            )
        matrix = jnp.concatenate(rows, -1)  # [B M, T, N]: the sparse-as-dense sampling matrix
        out = jnp.einsum(
            "ntp,npe->nte", matrix, heads_first.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
        return out

    def gathered():
        out = jnp.zeros((B * M, T, E), jnp.float32)
        for l, (h, w) in enumerate(shapes):
            level = heads_first[:, starts[l] : starts[l + 1]].reshape(B * M, h, w, E)
            sampled = bilinear_gather(
                level, 2 * locs[:, l] - 1, align_corners=False, padding="zeros", implementation="xla"
            )  # [B M, T, K, E]
            out = out + jnp.sum(weights[:, l, ..., None] * sampled.astype(jnp.float32), axis=-2)
        return out

    out = dispatch.run("deformable_attention", {"reference": reference, "xla": gathered}, implementation)
    return out.reshape(B, M, T, E).transpose(0, 2, 1, 3).astype(values.dtype)
