r"""Multi-token attention ("Multi-Token Attention", Golovneva et al., 2025).

Each attention weight is made from several query-key pairs instead of one: a 2-D convolution
over the logits along the query and key axes (per head), and a mixing of the attention weights
of the heads in a group:

.. math::

    \hat S = \mathrm{Mask}_{0}(\mathrm{scale}\, Q K^\top), \qquad
    \tilde S_{ij} = \sum_{a=0}^{c_q - 1} \sum_{b=-\lfloor c_k/2 \rfloor}^{\lceil c_k/2 \rceil - 1}
        \theta_{h, a, b}\, \hat S_{i-a,\, j-b},

    A = \mathrm{softmax}(\mathrm{Mask}_{-\infty}(\tilde S)), \qquad
    A'_{g h} = \sum_{h'} W_{g, h, h'} A_{g h'}, \qquad O = A' V

``Mask_0`` zeroes the masked logits *before* the convolution and ``Mask_{-inf}`` removes them
*after* it (the paper's two masks), so a causal mask stays causal: the convolution only looks at
earlier queries (``a >= 0``) and the keys it borrows from are zeroed unless the query sees them.
Head mixing (``W``, ``[H / c_h, c_h, c_h]``) acts on groups of ``c_h`` consecutive heads after the
softmax. The paper's group normalization of the outputs belongs to the module around the op.

**Conventions** (``convention=``). ``"paper"`` (default) reads ``kernel`` and ``head_mix`` as in
the equations above. ``"official"`` reads them as the released code stores them
(facebookresearch/RAM ``projects/mta``): ``kernel`` ``[H, c_q, c_k]`` is the weight of its
``F.conv2d`` (a cross-correlation over logits padded by ``c_q - 1`` earlier queries and
``(c_k - 1) / 2`` keys on each side, ``pad_key="both"``, so ``c_k`` is odd), i.e. both kernel
axes reversed: ``theta[h, a, b] = kernel[h, c_q - 1 - a, c_k - 1 - b]``, its identity at
``[h, c_q - 1, c_k // 2]``; ``head_mix`` multiplies from the right
(``A'_j = sum_i W[g, i, j] A_i``, ``torch.matmul(scores.transpose(1, -1), head_kernel)``), the
transpose of ``W`` above. The maths is the same; only the parameter layout differs, so official
checkpoints load without flipping by hand.

Cost: the ``[T, S]`` logits are formed (like the paper's implementation): ``O(T S (D + c_q c_k))``
time and ``O(T S)`` memory per head. ``"reference"`` writes the double sum as shifted copies;
``"xla"`` uses one grouped ``lax.conv_general_dilated``. Positions are aligned bottom-right.

Letter legend: B batch, T query length, S key length, H query heads, K key/value heads,
D head dim, E value dim; c_q x c_k the kernel, c_h the head-group size.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.masks import Mask
from attnjax.normalizers import MASKED
from attnjax.core import dispatch, tiling
from attnjax.core.utils import default_scale
from attnjax.core.dispatch import Implementation


def multi_token_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    *,
    kernel: Float[Array, "H cq ck"] | None = None,
    head_mix: Float[Array, "G ch ch"] | None = None,
    mask: Mask | None = None,
    scale: float | None = None,
    convention: str = "paper",
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    r"""Multi-token attention: key-query convolution over the logits, then head mixing.

    Args:
      q, k, v: as :func:`attnjax.ops.attention` (GQA allowed).
      kernel: ``theta`` ``[H, c_q, c_k]``; entry ``[h, a, b + floor(c_k / 2)]`` weighs the logit of
        query ``i - a`` and key ``j - b``. The identity kernel (1 at ``[h, 0, floor(c_k / 2)]``)
        gives plain attention. None: no convolution.
      head_mix: ``W`` ``[H / c_h, c_h, c_h]`` mixing the weights of each group of ``c_h`` heads
        (identity: no mixing). None: no mixing.
      mask: an :mod:`attnjax.masks` mask, applied before (as zeros) and after (as exclusions)
        the convolution.
      scale: logit scale, default ``1 / sqrt(D)``.
      convention: ``"paper"`` or ``"official"``: the layout of ``kernel`` and ``head_mix``
        (module docstring).
      implementation: ``"reference"`` (shifted copies), ``"xla"`` (grouped convolution),
        ``None`` or a sequence.

    Returns:
      ``[B, T, H, E]`` in ``q.dtype`` (float32 arithmetic). Rows with no allowed key are zero.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import masks, ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 10, 4, 8))
    >>> theta = jax.random.normal(jax.random.key(1), (4, 3, 5))
    >>> mix = jnp.stack([jnp.eye(2), jnp.ones((2, 2)) / 2])   # 2 groups of 2 heads
    >>> out = ops.multi_token_attention(q, k, v, kernel=theta, head_mix=mix, mask=masks.causal())
    >>> ref = ops.multi_token_attention(q, k, v, kernel=theta, head_mix=mix, mask=masks.causal(),
    ...                                 implementation="reference")
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-4))
    ((1, 10, 4, 8), True)
    """
    B, T, S, H, K, D, E = _checks.check_qkv(q, k, v)
    if kernel is not None:
        kshape = _checks.check_rank("kernel", kernel, ("heads", "query_width", "key_width"))
        _checks.check_float("kernel", kernel)
        _checks.check_dim("kernel", kshape, 0, H, "heads, as in q")
    if head_mix is not None:
        mshape = _checks.check_rank("head_mix", head_mix, ("groups", "group_size", "group_size"))
        _checks.check_float("head_mix", head_mix)
        if mshape[1] != mshape[2] or mshape[0] * mshape[1] != H:
            raise ValueError(
                f"head_mix has shape {mshape}; expected [groups, c_h, c_h] with groups * c_h = heads = {H}"
            )
    if mask is not None:
        if not isinstance(mask, Mask):
            raise TypeError(f"mask must be an attnjax.masks mask or None; got {type(mask).__name__}")
        mask.check(B, H, T, S)
    scale = default_scale(D, scale)
    if _checks.convention(convention) == "official":
        kernel, head_mix = official_to_paper(kernel, head_mix)

    def run(convolve):
        def fn():
            s = tiling.scores(q, k, float(scale))  # [B, H, T, S] float32
            allowed = jnp.ones((1, 1, T, S), bool) if mask is None else mask.materialize(T, S, batch=B, heads=H)
            if kernel is not None:
                s = convolve(jnp.where(allowed, s, 0.0), kernel.astype(jnp.float32))
            # A finite fill, then exact zeros: rows with no allowed key give zeros, not NaN.
            w = jnp.where(allowed, jax.nn.softmax(jnp.where(allowed, s, MASKED), axis=-1), 0.0)
            if head_mix is not None:
                G, ch = head_mix.shape[:2]
                w = w.reshape(B, G, ch, T, S)
                w = jnp.einsum("gij,bgjts->bgits", head_mix.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
                w = w.reshape(B, H, T, S)
            out = tiling.weighted_values(w, v)  # [B, H, T, E]
            return out.transpose(0, 2, 1, 3).astype(q.dtype)
        return fn

    impls = {"reference": run(_conv_shifts), "xla": run(_conv_xla)}
    return dispatch.run("multi_token_attention", impls, implementation)


def official_to_paper(kernel, head_mix):
    """``(theta, W)`` in this module's layout from the official code's ``(mta_kernel [H, c_q, c_k],
    head_kernel [G, c_h, c_h])`` (either may be None): both kernel axes reversed, ``W``
    transposed. Official kernels pad keys symmetrically, so ``c_k`` must be odd."""
    if kernel is not None:
        if kernel.shape[-1] % 2 == 0:
            raise ValueError(
                f"convention='official' pads keys by (c_k - 1) / 2 on each side, so c_k must be odd; "
                f"got kernel of shape {kernel.shape}"
            )
        kernel = kernel[:, ::-1, ::-1]
    if head_mix is not None:
        head_mix = jnp.swapaxes(head_mix, -1, -2)
    return kernel, head_mix


def _conv_shifts(s: Array, theta: Array) -> Array:
    """The double sum of the module docstring, one shifted copy of ``s`` per kernel entry."""
    _, cq, ck = theta.shape
    T, S = s.shape[-2:]
    c = ck // 2
    padded = jnp.pad(s, ((0, 0), (0, 0), (cq - 1, 0), (ck, ck)))
    out = jnp.zeros_like(s)
    for a in range(cq):
        for col in range(ck):
            b = col - c  # key offset: weighs the logit at (i - a, j - b)
            shifted = padded[:, :, cq - 1 - a: cq - 1 - a + T, ck - b: ck - b + S]
            out = out + theta[None, :, a, col, None, None] * shifted
    return out


def _conv_xla(s: Array, theta: Array) -> Array:
    """The same sum as a grouped 2-D cross-correlation (one group per head)."""
    H, cq, ck = theta.shape
    c = ck // 2
    rhs = theta[:, ::-1, ::-1][:, None]  # [H, 1, cq, ck], flipped: correlation -> convolution
    return lax.conv_general_dilated(
        s, rhs, window_strides=(1, 1), padding=((cq - 1, 0), (ck - 1 - c, c)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=H,
        precision=lax.Precision.HIGHEST,
    )
