r"""Area attention ("YOLOv12: Attention-Centric Real-Time Object Detectors", Tian, Ye, Doermann,
2025, arXiv 2502.12524).

The ``N = h w`` tokens of a feature map, flattened row-major, are cut into ``area`` contiguous
segments of ``N / area`` tokens (horizontal stripes of the image); softmax attention runs inside
each segment:

.. math:: O = \mathrm{softmax}\big(\mathrm{scale}\, Q K^\top + M_{\mathrm{chunk}(N / \mathrm{area})}\big) V

The reference is :func:`attnjax.ops.attention` with :func:`attnjax.masks.chunked`; the efficient
path reshapes the segments into the batch (``O(N^2 D / area)``), as the official ``AAttn`` does.
``area = 1`` is full attention; ``area = h`` is attention along each image row.

Letter legend: B batch, N tokens, H heads, K key/value heads, D head dim, E value dim.
"""

from __future__ import annotations

from jaxtyping import Array, Float

from attnjax import _checks, masks
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention


def area_attention(
    q: Float[Array, "B N H D"],
    k: Float[Array, "B N K D"],
    v: Float[Array, "B N K E"],
    *,
    area: int = 4,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B N H E"]:
    r"""Softmax attention inside ``area`` equal contiguous segments of the sequence (YOLOv12's
    area attention; flatten an ``h x w`` map row-major first). ``area`` divides ``N``.
    ``implementation``: ``"reference"`` (chunked mask), ``"xla"`` / ``"pallas"`` (segments as
    the batch of :func:`attnjax.ops.attention`), ``None``.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 24, 2, 4))
    >>> out = ops.area_attention(q, k, v, area=4)
    >>> bool(jnp.allclose(out, ops.area_attention(q, k, v, area=4, implementation="reference"), atol=1e-5))
    True
    """
    B, N = _checks.check_qkv(q, k, v, same_length=True)[:2]
    area = _checks.positive_int("area", area)
    if N % area:
        raise ValueError(f"area={area} must divide the sequence length {N} (pad the map, as YOLOv12 does)")
    size = N // area

    def reference():
        return attention(q, k, v, mask=masks.chunked(size), scale=scale, implementation="reference")

    def segmented(impl):
        def run():
            seg = lambda x: x.reshape(B * area, size, *x.shape[2:])
            out = attention(seg(q), seg(k), seg(v), scale=scale, implementation=impl)
            return out.reshape(B, N, *out.shape[2:])

        return run

    impls = {"reference": reference, "xla": segmented("xla"), "pallas": segmented("pallas")}
    return dispatch.run("area_attention", impls, implementation)
