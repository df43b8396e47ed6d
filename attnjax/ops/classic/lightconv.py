r"""Lightweight and dynamic convolutions ("Pay Less Attention with Lightweight and Dynamic
Convolutions", Wu et al., ICLR 2019; fairseq ``lightweight_convolution.py``,
``dynamic_convolution.py``).

.. math::

    \mathrm{LightConv}(X)_{i,c} = \sum_{j=1}^{k} \mathrm{softmax}(W_{h(c),:})_j\,
    X_{i + j - \lceil (k+1)/2 \rceil,\, c}

with ``H`` weight-shared heads (channel ``c`` uses head ``h(c) = c // (C / H)``, contiguous
channel groups as fairseq), the kernel softmax-normalized over its ``k`` taps and zero padding
at the borders; causal (decoder) offsets are ``i - k + 1 .. i``. DynamicConv predicts the kernel
per position (``W_i = X_i W^Q``, ``[B, T, H, k]``), then the same sum.

As attention: values = ``X`` split into ``H`` heads of ``C / H`` channels, no ``q . k``, a band
mask (``masks.sliding_window``) and the per-query bias ``log softmax(W_i)[j - i + pad]`` read by
offset inside each tile, under the normalizer ``exp``: the weights are exactly the normalized
kernel (at the borders the taps that fall outside the sequence are simply absent, as zero
padding; a softmax over the visible keys would renormalize them instead). The blockwise path
skips every tile outside the band: ``O(T k C)`` work.

Letter legend: B batch, T positions, C channels, H kernel heads, k kernel width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks, masks, normalizers, score_mods
from attnjax.core import dispatch
from attnjax.core.blocks import BlockSizes
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention

_EXP = normalizers.elementwise(jnp.exp)


def _left(width: int, causal: bool) -> int:
    """Taps before the current position: ``k - 1`` (causal) or ``ceil((k + 1) / 2) - 1 = k // 2``
    (the paper's offsets; for even ``k`` this is one more tap on the left than on the right)."""
    return width - 1 if causal else width // 2


def dynamic_conv(
    x: Float[Array, "B T C"],
    kernel: Float[Array, "B T H k"],
    *,
    causal: bool = False,
    implementation: Implementation = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T C"]:
    r"""DynamicConv: position ``i`` convolves with its own softmax-normalized kernel
    ``softmax(kernel[b, i, h])`` (module docstring); ``kernel`` holds logits.

    ``implementation``: ``"reference"`` (zero-padded unfold, ``O(T k C)``) or ``"xla"``
    (``ops.attention`` under the band mask, tiles outside it skipped).

    >>> import jax.numpy as jnp
    >>> x = jnp.arange(5.0).reshape(1, 5, 1)
    >>> (3 * dynamic_conv(x, jnp.zeros((1, 5, 1, 3)))[0, :, 0]).round().tolist()  # 3 taps, zero padded
    [1.0, 3.0, 6.0, 9.0, 7.0]
    """
    B, T, C = _checks.check_rank("x", x, ("batch", "len", "channels"))
    kshape = _checks.check_rank("kernel", kernel, ("batch", "len", "heads", "width"))
    _checks.check_float("x", x)
    _checks.check_float("kernel", kernel)
    if kshape[:2] != (B, T) or C % kshape[2]:
        raise ValueError(f"kernel must be [batch={B}, len={T}, H, k] with H dividing C={C}; got {kshape}")
    H, k = kshape[2], kshape[3]
    left = _left(k, causal)
    logw = jax.nn.log_softmax(kernel.astype(jnp.float32), -1)  # [B, T, H, k]

    def reference():
        xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (left, k - 1 - left), (0, 0)))
        taps = jnp.stack([xp[:, j : j + T] for j in range(k)], 2).reshape(B, T, k, H, C // H)
        return (
            jnp.einsum("bthk,btkhc->bthc", jnp.exp(logw), taps, precision="highest")
            .reshape(B, T, C)
            .astype(x.dtype)
        )

    def xla():
        def fn(table, score, b, h, q_idx, kv_idx):
            slot = jnp.clip(kv_idx - q_idx + left, 0, k - 1)
            return score + table[b, jnp.clip(q_idx, 0, T - 1), h, slot]

        z = jnp.zeros((B, T, H, 1), x.dtype)
        band = masks.sliding_window(left, k - 1 - left)
        out = attention(
            z,
            z,
            x.reshape(B, T, H, C // H),
            mask=band,
            scale=1.0,
            normalizer=_EXP,
            score_mod=score_mods.from_fn(fn, logw),
            implementation="xla",
            block_sizes=block_sizes,
        )
        return out.reshape(B, T, C)

    return dispatch.run("dynamic_conv", {"reference": reference, "xla": xla}, implementation)


def lightweight_conv(
    x: Float[Array, "B T C"],
    weight: Float[Array, "H k"],
    *,
    causal: bool = False,
    implementation: Implementation = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T C"]:
    r"""LightConv: one softmax-normalized kernel per head, shared by positions (module docstring);
    ``weight`` holds logits ``[H, k]``. It is :func:`dynamic_conv` with a constant kernel.

    >>> import jax.numpy as jnp
    >>> x = jnp.arange(4.0).reshape(1, 4, 1)
    >>> lightweight_conv(x, jnp.array([[0.0, -1e9]]), causal=True)[0, :, 0]   # all weight on i - 1
    Array([0., 0., 1., 2.], dtype=float32)
    """
    B, T, _ = _checks.check_rank("x", x, ("batch", "len", "channels"))
    _checks.check_rank("weight", weight, ("heads", "width"))
    kernel = jnp.broadcast_to(weight.astype(x.dtype), (B, T, *weight.shape))
    return dynamic_conv(x, kernel, causal=causal, implementation=implementation, block_sizes=block_sizes)
