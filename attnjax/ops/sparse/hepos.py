r"""Head-wise positional strides (Hepos; "Efficient Attentions for Long Document Summarization",
Huang et al., NAACL 2021).

Encoder-decoder cross-attention in which head ``h`` with stride ``s`` attends only to the source
positions ``j = h (mod s)``; heads ``0..s-1`` together cover every source position once (all of
them when ``H >= s``):

.. math::

    O_{i,h} = \mathrm{softmax}_{j \equiv h\ (\mathrm{mod}\ s)}(q_{i,h} \cdot k_{j} / \sqrt D)\, V.

The reference is ``ops.attention`` under :func:`head_stride_mask`; the xla path gathers
``k[:, (h mod s)::s]`` per head (a reshape of the padded keys, ``O(S D)``) and attends densely over
the ``ceil(S / s)`` keys: ``O(T S D / s)``. Tile skipping cannot help here (every tile holds some
allowed key), the gather can.

Letter legend: B batch, T queries, S source keys, H heads, K key/value heads, D head dim, E value dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks, masks
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention


def head_stride_mask(stride: int, heads: int) -> masks.Mask:
    """``(kv_idx - h) % stride == 0`` for query head ``h``."""
    s = _checks.positive_int("stride", stride)
    return masks.from_fn(lambda b, h, i, j: (j - h) % s == 0, heads=heads)


def hepos_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    stride: int,
    *,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    """Hepos cross-attention (module docstring).

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = jax.random.normal(jax.random.key(0), (1, 5, 4, 8))
    >>> k = v = jax.random.normal(jax.random.key(1), (1, 13, 4, 8))
    >>> out = ops.hepos_attention(q, k, v, 2)
    >>> ref = ops.hepos_attention(q, k, v, 2, implementation="reference")
    >>> bool(jnp.allclose(out, ref, atol=1e-5))
    True
    """
    B, T, S, H, K, D, E = _checks.check_qkv(q, k, v)
    s = _checks.positive_int("stride", stride)
    impls = {
        "reference": lambda: attention(
            q, k, v, mask=head_stride_mask(s, H), scale=scale, implementation="reference"
        ),
        "xla": lambda: _gathered(q, k, v, s, scale),
    }
    return dispatch.run("hepos_attention", impls, implementation)


def _gathered(q, k, v, s, scale):
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    m = -(-S // s)
    offset = jnp.arange(H) % s
    kv_head = jnp.arange(H) // (H // K)

    def strided(x):  # [B, S, K, .] -> [B, m, H, .]: per query head its residue class
        x = jnp.pad(x, ((0, 0), (0, m * s - S), (0, 0), (0, 0))).reshape(B, m, s, K, x.shape[-1])
        return x[:, :, offset, kv_head]

    # Only the last strided key of a head may be padding (a ragged tail): mask it analytically.
    mask = None if S % s == 0 else masks.from_fn(lambda b, h, i, j: j * s + h % s < S, heads=H)
    return attention(q, strided(k), strided(v), mask=mask, scale=scale, implementation="xla")
