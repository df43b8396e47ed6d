r"""HaloNet blocked local self-attention ("Scaling Local Self-Attention for Parameter Efficient
Visual Backbones", Vaswani et al., CVPR 2021, arXiv 2103.12731).

Queries on an ``h x w`` grid are cut into non-overlapping ``b x b`` blocks; each block attends to
its ``n x n`` window, ``n = b + 2 halo``: the block grown by ``halo`` on every side. With
content-relative logits factorized over the axes,

.. math::

    O_i = \mathrm{softmax}_j\Big(\mathrm{scale}\; q_i \cdot k_j + q_i \cdot (r^{row}_{dy_{ij}} + r^{col}_{dx_{ij}})\Big)\, V_j,
    \qquad j \in \mathrm{window}(i)

where ``(dy, dx)`` is the key's grid offset from the query and the tables ``r^row, r^col`` are
``[2n - 1, D]``, read at ``offset + halo + n - 1`` (timm's ``rel_logits_1d`` indexing; timm
scales ``q`` before the relative logits, so its tables are ours divided by ``scale``).

Keys outside the image (the zero padding of border windows) are masked by default;
``attend_padding=True`` attends to them as timm does (a zero key: logit = the relative term
only, a zero value).

The efficient path unfolds the (overlapping) windows and batches them into
:func:`attnjax.ops.attention` (``O(h w n^2 D)``), the relative logits going in as a score mod
over per-window ``[2n - 1]`` tables per query (read per tile: no ``n^2``-per-query bias array);
the reference is :func:`attnjax.ops.attention` over the whole zero-padded grid with the halo
mask and the relative logits as a score mod (``O((h w)^2 D)``).

Letter legend: B batch, (h, w) grid, H heads, K key/value heads, D head dim, E value dim.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attnjax import _checks, masks, score_mods
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.core.utils import default_scale
from attnjax.masks.grid import halo_mask
from attnjax.ops.attention.api import attention


def _windows(x: Array, block: int, halo: int) -> Array:
    """``[B, hp, wp, ...]`` (padded) -> ``[B * nh * nw, n * n, ...]``: the overlapping windows."""
    n = block + 2 * halo
    B, hp, wp = x.shape[:3]
    nh, nw = (hp - 2 * halo) // block, (wp - 2 * halo) // block
    rows = (np.arange(nh) * block)[:, None] + np.arange(n)  # [nh, n]
    cols = (np.arange(nw) * block)[:, None] + np.arange(n)
    x = x[:, rows]  # [B, nh, n, wp, ...]
    x = x[:, :, :, cols]  # [B, nh, n, nw, n, ...]
    x = jnp.moveaxis(x, 3, 2)  # [B, nh, nw, n, n, ...]
    return x.reshape(B * nh * nw, n * n, *x.shape[5:])


def halo_attention(
    q: Float[Array, "B h w H D"],
    k: Float[Array, "B h w K D"],
    v: Float[Array, "B h w K E"],
    *,
    block: int,
    halo: int,
    rel_row: Float[Array, "R D"] | None = None,
    rel_col: Float[Array, "R D"] | None = None,
    attend_padding: bool = False,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B h w H E"]:
    r"""HaloNet attention: ``b x b`` query blocks attend to their ``(b + 2 halo)^2`` windows (the
    module docstring has the equation).

    Args:
      q, k, v: ``[B, h, w, H|K, D|E]`` on the same grid; ``block`` divides ``h`` and ``w``.
      block, halo: the block side and the halo width (``halo = 0`` is
        :func:`attnjax.ops.block_attention` with ``window=block``).
      rel_row, rel_col: the relative tables ``[2 n - 1, D]`` (both or neither), shared by heads.
      attend_padding: attend to the zero padding at the borders (timm) instead of masking it.
      implementation: ``"xla"`` / ``"pallas"`` (unfolded windows through
        :func:`attnjax.ops.attention`), ``"reference"`` (dense over the padded grid), ``None``.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 8, 8, 2, 4))
    >>> r = 0.1 * jax.random.normal(jax.random.key(1), (2, 15, 4))
    >>> out = ops.halo_attention(q, k, v, block=4, halo=2, rel_row=r[0], rel_col=r[1])
    >>> ref = ops.halo_attention(q, k, v, block=4, halo=2, rel_row=r[0], rel_col=r[1], implementation="reference")
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
    ((1, 8, 8, 2, 4), True)
    """
    B, h, w, H, D = _checks.check_rank("q", q, ("batch", "height", "width", "heads", "head_dim"))
    for name, x in (("k", k), ("v", v)):
        shape = _checks.check_rank(name, x, ("batch", "height", "width", "kv_heads", "head_dim"))
        if shape[:3] != (B, h, w):
            raise ValueError(
                f"{name} has shape {shape}; its grid [batch, height, width] must be q's {(B, h, w)}"
            )
    b = _checks.positive_int("block", block)
    halo = _checks.positive_int("halo", halo, allow_zero=True)
    if h % b or w % b:
        raise ValueError(f"block={b} must divide the grid {(h, w)} (pad the image first, as HaloNet does)")
    n = b + 2 * halo
    if (rel_row is None) != (rel_col is None):
        raise ValueError("rel_row and rel_col come together (both or neither)")
    rel = rel_row is not None
    if rel:
        for name, t in (("rel_row", rel_row), ("rel_col", rel_col)):
            if _checks.check_rank(name, t, ("2n-1", "head_dim")) != (2 * n - 1, D):
                raise ValueError(
                    f"{name} must have shape [2n-1={2 * n - 1}, D={D}] for block {b}, halo {halo}; "
                    f"got {t.shape}"
                )
    scale = default_scale(D, scale)
    pad = lambda x: jnp.pad(x, ((0, 0), (halo, halo), (halo, halo), (0, 0), (0, 0)))
    kp, vp = pad(k), pad(v)
    hp, wp = h + 2 * halo, w + 2 * halo
    # content-relative logits q_i . r_m for every table entry m: [B, H, h w, 2n - 1] per axis
    rel_logits = lambda t: jnp.einsum(
        "byxhd,md->bhyxm", q.astype(jnp.float32), t.astype(jnp.float32), precision="highest"
    ).reshape(B, H, h * w, 2 * n - 1)

    def reference():
        flat = lambda x: x.reshape(B, -1, *x.shape[3:])
        mod = None
        if rel:

            def fn(tables, score, b_, h_, q_idx, kv_idx):
                row, col = tables
                dy = kv_idx // wp - halo - q_idx // w
                dx = kv_idx % wp - halo - q_idx % w
                iy = jnp.clip(dy + halo + n - 1, 0, 2 * n - 2)
                ix = jnp.clip(dx + halo + n - 1, 0, 2 * n - 2)
                return score + row[b_, h_, q_idx, iy] + col[b_, h_, q_idx, ix]

            mod = score_mods.from_fn(fn, (rel_logits(rel_row), rel_logits(rel_col)))
        mask = halo_mask(b, halo, (h, w), attend_padding=attend_padding)
        out = attention(
            flat(q), flat(kp), flat(vp), mask=mask, score_mod=mod, scale=scale, implementation="reference"
        )
        return out.reshape(B, h, w, H, -1)

    def windowed(impl):
        def run():
            nh, nw = h // b, w // b
            qb = q.reshape(B, nh, b, nw, b, H, D).transpose(0, 1, 3, 2, 4, 5, 6).reshape(-1, b * b, H, D)
            kw, vw = _windows(kp, b, halo), _windows(vp, b, halo)  # [B nh nw, n n, K, D|E]
            mod = None
            if rel:
                # the content-relative logits as a score mod over per-window tables [N, H, b b, 2n - 1]:
                # query (qy, qx) of a block, key (ky, kx) of its window read entry ky - qy + n - 1
                # (per tile on the blockwise path: no [N, H, b b, n n] bias array)
                def per_window(t):
                    t = t.reshape(B, H, nh, b, nw, b, 2 * n - 1).transpose(0, 2, 4, 1, 3, 5, 6)
                    return t.reshape(-1, H, b * b, 2 * n - 1)

                def fn(tables, score, b_, h_, q_idx, kv_idx):
                    row, col = tables
                    iy = kv_idx // n - q_idx // b + n - 1
                    ix = kv_idx % n - q_idx % b + n - 1
                    return score + row[b_, h_, q_idx, iy] + col[b_, h_, q_idx, ix]

                mod = score_mods.from_fn(
                    fn, (per_window(rel_logits(rel_row)), per_window(rel_logits(rel_col)))
                )
            mask = None
            if not attend_padding and halo:
                inside = np.zeros((hp, wp), bool)
                inside[halo : halo + h, halo : halo + w] = True
                valid = _windows(jnp.asarray(inside)[None, :, :, None], b, halo)[..., 0]  # [nh nw, n n]
                mask = masks.dense(
                    jnp.broadcast_to(
                        jnp.tile(valid, (B, 1))[:, None, None, :], (B * nh * nw, 1, b * b, n * n)
                    )
                )
            out = attention(qb, kw, vw, mask=mask, score_mod=mod, scale=scale, implementation=impl)
            E = out.shape[-1]
            return out.reshape(B, nh, nw, b, b, H, E).transpose(0, 1, 3, 2, 4, 5, 6).reshape(B, h, w, H, E)

        return run

    impls = {"reference": reference, "xla": windowed("xla"), "pallas": windowed("pallas")}
    return dispatch.run("halo_attention", impls, implementation)
