r"""Bilinear sampling of a feature map at real-valued points (``grid_sample``), with a custom VJP.

.. math::

    \mathrm{out}_{b,p} = \sum_{i,j} \max(0, 1 - |y_p - i|)\,\max(0, 1 - |x_p - j|)\; X_{b,i,j}

for pixel coordinates ``(x_p, y_p)`` (pixel ``(i, j)``'s centre at ``x = j, y = i``): at most four
pixels contribute. The efficient path gathers those four corners (``O(P C)`` for ``P`` points);
the reference forms the dense ``[P, h w]`` weight matrix above and multiplies (``O(P h w C)``).
Its custom VJP keeps only the inputs as residuals and re-gathers in the backward pass: the
values' gradient is a scatter-add of the corner weights times the cotangent, the coordinates'
the analytic derivative of the weights (``d w / d x`` of each corner).

Coordinates follow ``torch.nn.functional.grid_sample``: ``coords[..., 0]`` is ``x`` (width),
``coords[..., 1]`` is ``y`` (height), normalized to ``[-1, 1]`` unless ``normalized=False``
(pixel units). ``align_corners=True`` puts ``-1`` and ``1`` on the centres of the corner pixels,
``False`` on the outer edges of the corner pixels. ``padding="zeros"`` reads zeros outside the
map; ``"border"`` clamps the coordinates to the map (gradient zero where clamped).

Used by multi-scale deformable attention (:mod:`attnjax.ops.vision.deformable`) and the
deformable gate of :mod:`attnjax.nn.cnn`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation

PADDINGS = ("zeros", "border")


def to_pixels(
    coords: Array, height: int, width: int, *, align_corners: bool, normalized: bool, padding: str
) -> tuple[Array, Array]:
    """``(x, y)`` pixel coordinates (float32) of ``coords [..., 2]``, clamped for ``"border"``."""
    c = coords.astype(jnp.float32)
    x, y = c[..., 0], c[..., 1]
    if normalized:
        if align_corners:
            x, y = (x + 1) * (width - 1) / 2, (y + 1) * (height - 1) / 2
        else:
            x, y = ((x + 1) * width - 1) / 2, ((y + 1) * height - 1) / 2
    if padding == "border":
        x, y = jnp.clip(x, 0, width - 1), jnp.clip(y, 0, height - 1)
    return x, y


def _corners(x, y, height, width):
    """The four corners ``(row, col, weight, d weight/dx, d weight/dy, inside)`` of each point."""
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0
    out = []
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        wx, gx = (fx, 1.0) if dx else (1 - fx, -1.0)
        wy, gy = (fy, 1.0) if dy else (1 - fy, -1.0)
        row, col = (y0 + dy).astype(jnp.int32), (x0 + dx).astype(jnp.int32)
        inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
        out.append(
            (jnp.clip(row, 0, height - 1), jnp.clip(col, 0, width - 1), wx * wy, gx * wy, wx * gy, inside)
        )
    return out


def _flat_points(x, y):
    """``[B, P]`` views of the point coordinates (any shape after the batch axis)."""
    B = x.shape[0]
    return x.reshape(B, -1), y.reshape(B, -1)


@jax.custom_vjp
def _gather(values, x, y):
    """``values [B, h, w, C]`` sampled at pixel coordinates ``x, y [B, P]`` -> ``[B, P, C]`` (f32)."""
    B, h, w, C = values.shape
    flat = values.reshape(B, h * w, C)
    out = jnp.zeros(x.shape + (C,), jnp.float32)
    for row, col, wgt, _, _, inside in _corners(x, y, h, w):
        picked = jnp.take_along_axis(flat, (row * w + col)[..., None], axis=1).astype(jnp.float32)
        out = out + jnp.where(inside, wgt, 0.0)[..., None] * picked
    return out


def _gather_fwd(values, x, y):
    return _gather(values, x, y), (values, x, y)


def _gather_bwd(res, g):
    values, x, y = res
    B, h, w, C = values.shape
    flat = values.reshape(B, h * w, C)
    g = g.astype(jnp.float32)
    d_flat = jnp.zeros((B, h * w, C), jnp.float32)
    dx = jnp.zeros(x.shape, jnp.float32)
    dy = jnp.zeros(y.shape, jnp.float32)
    batch = jnp.arange(B)[:, None]
    for row, col, wgt, gx, gy, inside in _corners(x, y, h, w):
        index = row * w + col
        picked = jnp.take_along_axis(flat, index[..., None], axis=1).astype(jnp.float32)
        dot = jnp.where(inside, jnp.sum(g * picked, -1), 0.0)  # [B, P]: d out . v_corner
        dx, dy = dx + gx * dot, dy + gy * dot
        d_flat = d_flat.at[batch, index].add(jnp.where(inside, wgt, 0.0)[..., None] * g)
    return d_flat.reshape(values.shape).astype(values.dtype), dx.astype(x.dtype), dy.astype(y.dtype)


_gather.defvjp(_gather_fwd, _gather_bwd)


def dense_weights(x: Array, y: Array, height: int, width: int) -> Float[Array, "B P hw"]:
    """The bilinear weights of every point on every pixel, ``[B, P, h w]`` (row-major pixels):
    the reference's sparse-as-dense sampling matrix (a tent in each axis, zero padding)."""
    rows = jnp.arange(height, dtype=jnp.float32)
    cols = jnp.arange(width, dtype=jnp.float32)
    wy = jax.nn.relu(1 - jnp.abs(y[..., None] - rows))  # [B, P, h]
    wx = jax.nn.relu(1 - jnp.abs(x[..., None] - cols))  # [B, P, w]
    return (wy[..., :, None] * wx[..., None, :]).reshape(*x.shape, height * width)


def bilinear_gather(
    x: Float[Array, "B h w C"],
    coords: Float[Array, "B *P 2"],
    *,
    align_corners: bool = False,
    padding: str = "zeros",
    normalized: bool = True,
    implementation: Implementation = None,
) -> Float[Array, "B *P C"]:
    r"""Samples the map ``x [B, h, w, C]`` bilinearly at ``coords [B, *P, 2]`` (``(x, y)`` pairs,
    as ``grid_sample``) and returns ``[B, *P, C]`` in ``x``'s dtype (float32 arithmetic).

    Differentiable with respect to ``x`` and ``coords`` (a custom VJP that re-gathers the four
    corners instead of storing them). ``implementation``: ``"xla"`` (the four-corner gather,
    ``O(P C)``) or ``"reference"`` (the dense ``[P, h w]`` tent-weight matrix times the map,
    ``O(P h w C)``, differentiated by autodiff). See the module docstring for the coordinate
    conventions.

    >>> import jax.numpy as jnp
    >>> from attnjax import ops
    >>> x = jnp.arange(6.0).reshape(1, 2, 3, 1)            # rows [0 1 2], [3 4 5]
    >>> pts = jnp.array([[[1.0, 0.0], [0.5, 0.5]]])         # pixel (x, y) coordinates
    >>> ops.bilinear_gather(x, pts, normalized=False)[..., 0]
    Array([[1., 2.]], dtype=float32)
    """
    B, h, w, C = _checks.check_rank("x", x, ("batch", "height", "width", "channels"))
    _checks.check_float("x", x)
    shape = getattr(coords, "shape", None)
    if shape is None or len(shape) < 2 or shape[-1] != 2 or shape[0] != B:
        raise ValueError(f"coords must have shape [batch={B}, ..., 2] ((x, y) pairs); got {shape}")
    _checks.check_float("coords", coords)
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}; got {padding!r}")
    px, py = to_pixels(coords, h, w, align_corners=align_corners, normalized=normalized, padding=padding)
    fx, fy = _flat_points(px, py)
    points = shape[1:-1]

    def reference():
        weights = dense_weights(fx, fy, h, w)
        flat = x.reshape(B, h * w, C).astype(jnp.float32)
        out = jnp.einsum("bpn,bnc->bpc", weights, flat, precision=jax.lax.Precision.HIGHEST)
        return out.reshape(B, *points, C).astype(x.dtype)

    def gathered():
        if dispatch.autodiff(x, coords).forward:  # a custom VJP has no forward-mode rule
            raise NotImplementedError("bilinear_gather's gather path serves reverse-mode autodiff only")
        return _gather(x, fx, fy).reshape(B, *points, C).astype(x.dtype)

    return dispatch.run("bilinear_gather", {"reference": reference, "xla": gathered}, implementation)
