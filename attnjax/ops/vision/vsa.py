r"""Varied-size window attention ("VSA: Learning Varied-Size Window Attention in Vision
Transformers", Zhang et al., ECCV 2022, arXiv 2204.08446).

Queries stay in their default ``p x p`` windows; each window ``w`` and head ``h`` samples its keys
and values bilinearly (zero padding) at ``p^2`` points of a scaled and shifted window:

.. math::

    \mathrm{pt}_{w,h,r} = c_w + (1 + s_{w,h}) \odot r + o_{w,h} / n_{win},\qquad
    O_w = \mathrm{softmax}\big(\mathrm{scale}\; Q_w \tilde K_{w,h}^\top + B_{rel}\big) \tilde V_{w,h}

in ``grid_sample``'s normalized coordinates with ``align_corners=True`` (``c_w`` the window's
centre, ``r`` the default in-window offsets, ``n_win`` the number of windows along each axis),
as the official ``VSAWindowAttention``. With ``s = o = 0`` the points are the window's own pixel
centres and this is window attention (:func:`attnjax.ops.block_attention`).

The efficient path samples with :func:`attnjax.ops.bilinear_gather` (four corners per point) and
runs the windows as the batch of :func:`attnjax.ops.attention`; the reference samples with the
dense bilinear matrix and attends with the dense reference.

Letter legend: B batch, (h, w) grid, (n_h, n_w) windows, H heads, D head dim, E value dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.masks.grid import pair
from attnjax.ops.attention.api import attention
from attnjax.ops.vision.sampling import bilinear_gather
from attnjax.score_mods import ScoreMod


def sampling_points(scales: Array, offsets: Array, grid: tuple[int, int], window: tuple[int, int]) -> Array:
    """VSA's sampling points ``[B, n_h, n_w, H, p_h, p_w, 2]`` (normalized ``(x, y)``,
    ``align_corners=True``) from ``scales`` and ``offsets`` ``[B, n_h, n_w, H, 2]`` (``(x, y)``)."""
    (h, w), (a, b) = grid, window
    nh, nw = h // a, w // b
    px = lambda n: jnp.float32(2.0 / (n - 1)) if n > 1 else jnp.float32(0.0)  # one pixel, normalized
    # the window centres and the in-window offsets of the default grid
    cy = -1 + px(h) * (jnp.arange(nh) * a + (a - 1) / 2)
    cx = -1 + px(w) * (jnp.arange(nw) * b + (b - 1) / 2)
    ry = px(h) * (jnp.arange(a) - (a - 1) / 2)
    rx = px(w) * (jnp.arange(b) - (b - 1) / 2)
    s = 1 + scales.astype(jnp.float32)[:, :, :, :, None, None, :]  # [B, nh, nw, H, 1, 1, 2]
    o = offsets.astype(jnp.float32)[:, :, :, :, None, None, :] / jnp.array([nw, nh], jnp.float32)
    x = cx[None, None, :, None, None, None] + s[..., 0] * rx[None, None, None, None, None, :] + o[..., 0]
    y = cy[None, :, None, None, None, None] + s[..., 1] * ry[None, None, None, None, :, None] + o[..., 1]
    x, y = jnp.broadcast_arrays(x, y)
    return jnp.stack([x, y], -1)


def sampled_window_attention(
    q: Float[Array, "B h w H D"],
    k: Float[Array, "B h w H D"],
    v: Float[Array, "B h w H E"],
    scales: Float[Array, "B nh nw H 2"],
    offsets: Float[Array, "B nh nw H 2"],
    *,
    window: int | tuple[int, int],
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B h w H E"]:
    r"""VSA attention: each default window's queries attend to keys and values sampled from its
    scaled and shifted window (the module docstring has the equation).

    Args:
      q, k, v: ``[B, h, w, H, D|E]`` (one key/value head per query head: the sampling is per head);
        ``window`` divides ``h`` and ``w``.
      scales, offsets: ``[B, n_h, n_w, H, 2]`` in ``(x, y)`` order, per window and head
        (VSA's regressor predicts them from the pooled window; zero is window attention).
      score_mod: sees window-local indices (``relative_bias_2d(table, window)`` is Swin's bias).
      implementation: ``"xla"`` (gather + windows as a batch), ``"reference"``, ``None``.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 8, 8, 2, 4))
    >>> zero = jnp.zeros((1, 2, 2, 2, 2))
    >>> out = ops.sampled_window_attention(q, k, v, zero, zero, window=4)
    >>> bool(jnp.allclose(out, ops.block_attention(q, k, v, window=4), atol=1e-5))
    True
    """
    B, h, w, H, D = _checks.check_rank("q", q, ("batch", "height", "width", "heads", "head_dim"))
    for name, x in (("k", k), ("v", v)):
        shape = _checks.check_rank(name, x, ("batch", "height", "width", "heads", "head_dim"))
        if shape[:4] != (B, h, w, H):
            raise ValueError(
                f"{name} has shape {shape}; its [batch, height, width, heads] must be q's {(B, h, w, H)} "
                "(VSA samples per head: no grouped-query heads)"
            )
    a, b = pair("window", window)
    if h % a or w % b:
        raise ValueError(f"window={(a, b)} must divide the grid {(h, w)}")
    nh, nw = h // a, w // b
    for name, x in (("scales", scales), ("offsets", offsets)):
        if _checks.check_rank(name, x, ("batch", "n_h", "n_w", "heads", "2")) != (B, nh, nw, H, 2):
            raise ValueError(f"{name} has shape {x.shape}; expected [B={B}, n_h={nh}, n_w={nw}, H={H}, 2]")
        _checks.check_float(name, x)
    E = v.shape[-1]
    points = sampling_points(scales, offsets, (h, w), (a, b))  # [B, nh, nw, H, a, b, 2]
    points = points.transpose(0, 3, 1, 2, 4, 5, 6).reshape(B * H, nh * nw * a * b, 2)
    maps = jnp.concatenate([k, v.astype(k.dtype)], -1).transpose(0, 3, 1, 2, 4).reshape(B * H, h, w, D + E)
    qw = q.reshape(B, nh, a, nw, b, H, D).transpose(0, 1, 3, 2, 4, 5, 6).reshape(B * nh * nw, a * b, H, D)

    def run(sample_impl, attn_impl):
        def go():
            kv = bilinear_gather(
                maps, points, align_corners=True, padding="zeros", implementation=sample_impl
            )
            kv = (
                kv.reshape(B, H, nh * nw, a * b, D + E)
                .transpose(0, 2, 3, 1, 4)
                .reshape(B * nh * nw, a * b, H, D + E)
            )
            out = attention(
                qw,
                kv[..., :D],
                kv[..., D:].astype(v.dtype),
                score_mod=score_mod,
                scale=scale,
                implementation=attn_impl,
            )
            return out.reshape(B, nh, nw, a, b, H, E).transpose(0, 1, 3, 2, 4, 5, 6).reshape(B, h, w, H, E)

        return go

    impls = {
        "reference": run("reference", "reference"),
        "xla": run("xla", "xla"),
        "pallas": run("xla", "pallas"),
    }
    return dispatch.run("sampled_window_attention", impls, implementation)
