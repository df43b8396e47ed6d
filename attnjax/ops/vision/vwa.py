r"""Varying window attention ("Multi-Scale Representations by Varying Window Attention for Semantic
Segmentation", Yan, Wu, Zhang, ICLR 2024, arXiv 2404.16573; read from the paper, the official
code was not inspected).

Queries stay in ``P x P`` windows; each window attends to its ``(R P) x (R P)`` context window
(centred on it), average-pooled by ``R`` to ``P x P`` keys and values, so the cost is that of
window attention whatever the ratio ``R``:

.. math::

    O_w = \mathrm{softmax}\big(\mathrm{scale}\; Q_w \bar K_w^\top\big) \bar V_w,\qquad
    \bar K_w[u, v] = \frac{1}{R^2} \sum_{a, b < R} K[y_w + R u + a,\ x_w + R v + b]

with ``(y_w, x_w) = (i P - (R - 1) P / 2, j P - (R - 1) P / 2)`` the context window's corner. Where
the context leaves the image, ``padding="replicate"`` (default) copies the border pixels outward
(our reading of the paper's copy-shift padding, CSP: a constant map stays constant, which zero
padding breaks), ``"zeros"`` pads zeros.

The efficient path box-filters the padded K/V maps once (``O(h w R^2)`` adds, independent of the
number of windows) and gathers each window's ``P^2`` pooled keys (``O(h w P^2 D)`` attention);
the reference unfolds every ``(R P)^2`` context window and pools it (``O(h w R^2 D)`` memory).

Letter legend: B batch, (h, w) grid, H heads, K key/value heads, D head dim, E value dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention

PADDINGS = ("replicate", "zeros")


def varying_window_attention(
    q: Float[Array, "B h w H D"],
    k: Float[Array, "B h w K D"],
    v: Float[Array, "B h w K E"],
    *,
    window: int,
    ratio: int,
    padding: str = "replicate",
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B h w H E"]:
    r"""VWA: ``window x window`` query windows attend to their ``ratio``-times larger context,
    pooled back to ``window x window`` keys (the module docstring has the equation).

    ``window`` divides ``h`` and ``w``; ``(ratio - 1) * window`` must be even (the context is
    centred). ``implementation``: ``"xla"`` / ``"pallas"`` (box filter + gather, windows as a
    batch), ``"reference"`` (unfolded contexts, pooled), ``None``.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 8, 8, 2, 4))
    >>> out = ops.varying_window_attention(q, k, v, window=4, ratio=3)
    >>> ref = ops.varying_window_attention(q, k, v, window=4, ratio=3, implementation="reference")
    >>> bool(jnp.allclose(out, ref, atol=1e-5))
    True
    """
    B, h, w, H, D = _checks.check_rank("q", q, ("batch", "height", "width", "heads", "head_dim"))
    for name, x in (("k", k), ("v", v)):
        shape = _checks.check_rank(name, x, ("batch", "height", "width", "kv_heads", "head_dim"))
        if shape[:3] != (B, h, w):
            raise ValueError(
                f"{name} has shape {shape}; its grid [batch, height, width] must be q's {(B, h, w)}"
            )
    P, R = _checks.positive_int("window", window), _checks.positive_int("ratio", ratio)
    if h % P or w % P:
        raise ValueError(f"window={P} must divide the grid {(h, w)}")
    if (R - 1) * P % 2:
        raise ValueError(
            f"(ratio - 1) * window must be even so the context is centred; got ratio={R}, window={P}"
        )
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}; got {padding!r}")
    halo = (R - 1) * P // 2
    nh, nw = h // P, w // P
    mode = "edge" if padding == "replicate" else "constant"
    kv = jnp.concatenate([k, v.astype(k.dtype)], -1).astype(jnp.float32)
    kvp = jnp.pad(kv, ((0, 0), (halo, halo), (halo, halo), (0, 0), (0, 0)), mode=mode)
    qw = q.reshape(B, nh, P, nw, P, H, D).transpose(0, 1, 3, 2, 4, 5, 6).reshape(B * nh * nw, P * P, H, D)
    Kh, F = kv.shape[3:]

    def reference():
        n = R * P
        rows = (np.arange(nh) * P)[:, None] + np.arange(n)
        cols = (np.arange(nw) * P)[:, None] + np.arange(n)
        ctx = jnp.moveaxis(kvp[:, rows][:, :, :, cols], 3, 2)  # [B, nh, nw, RP, RP, K, F]
        pooled = ctx.reshape(B, nh, nw, P, R, P, R, Kh, F).mean((4, 6))
        return pooled.reshape(B * nh * nw, P * P, Kh, F)

    def gathered():
        box = jax.lax.reduce_window(kvp, 0.0, jax.lax.add, (1, R, R, 1, 1), (1, 1, 1, 1, 1), "VALID") / (
            R * R
        )
        rows = (np.arange(nh) * P)[:, None] + R * np.arange(P)
        cols = (np.arange(nw) * P)[:, None] + R * np.arange(P)
        picked = jnp.moveaxis(box[:, rows][:, :, :, cols], 3, 2)  # [B, nh, nw, P, P, K, F]
        return picked.reshape(B * nh * nw, P * P, Kh, F)

    def run(pool, impl):
        def go():
            kvw = pool()
            out = attention(
                qw,
                kvw[..., :D].astype(q.dtype),
                kvw[..., D:].astype(v.dtype),
                scale=scale,
                implementation=impl,
            )
            E = out.shape[-1]
            return out.reshape(B, nh, nw, P, P, H, E).transpose(0, 1, 3, 2, 4, 5, 6).reshape(B, h, w, H, E)

        return go

    impls = {
        "reference": run(reference, "reference"),
        "xla": run(gathered, "xla"),
        "pallas": run(gathered, "pallas"),
    }
    return dispatch.run("varying_window_attention", impls, implementation)
