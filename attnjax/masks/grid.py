"""Grid masks of MaxViT's multi-axis attention over a row-major flattened ``(h, w)`` grid: block
attention (windows of adjacent tokens) and grid attention (tokens at a fixed stride).

``attnjax.ops.block_attention`` / ``grid_attention`` compute the same thing by reshaping into
groups; these masks are their dense references and let the generic op express them.
"""

from __future__ import annotations

from attnjax import _checks
from attnjax.masks.base import Mask, from_fn


def pair(name: str, value) -> tuple[int, int]:
    """``value`` as ``(height, width)``: an int is used for both."""
    if isinstance(value, int):
        value = (value, value)
    try:
        a, b = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or a pair of ints (height, width); got {value!r}") from None
    return _checks.positive_int(f"{name}[0]", a), _checks.positive_int(f"{name}[1]", b)


def check_grid(spatial: tuple[int, int], group: tuple[int, int], name: str) -> None:
    for axis, (n, g) in enumerate(zip(spatial, group)):
        if n % g:
            raise ValueError(
                f"{name}={group} must divide the grid {spatial} on each axis; axis {axis}: {n} % {g} = {n % g}"
            )


def block_mask(spatial: tuple[int, int], window: int | tuple[int, int]) -> Mask:
    """The block-attention mask over the row-major flattened ``spatial = (h, w)`` grid.

    >>> block_mask((2, 4), 2).materialize(8, 8)[0, 0, 0].astype(int)  # token (0, 0)
    Array([1, 1, 0, 0, 1, 1, 0, 0], dtype=int32)
    """
    (h, w), (ph, pw) = pair("spatial", spatial), pair("window", window)
    check_grid((h, w), (ph, pw), "window")
    same = lambda a, b: ((a // w) // ph == (b // w) // ph) & ((a % w) // pw == (b % w) // pw)
    return from_fn(lambda b, hd, q_idx, kv_idx: same(q_idx, kv_idx))


def grid_mask(spatial: tuple[int, int], grid: int | tuple[int, int]) -> Mask:
    """The grid-attention mask over the row-major flattened ``spatial = (h, w)`` grid.

    >>> grid_mask((2, 4), 2).materialize(8, 8)[0, 0, 0].astype(int)  # stride (1, 2)
    Array([1, 0, 1, 0, 1, 0, 1, 0], dtype=int32)
    """
    (h, w), (gh, gw) = pair("spatial", spatial), pair("grid", grid)
    check_grid((h, w), (gh, gw), "grid")
    sh, sw = h // gh, w // gw
    same = lambda a, b: ((a // w) % sh == (b // w) % sh) & ((a % w) % sw == (b % w) % sw)
    return from_fn(lambda b, hd, q_idx, kv_idx: same(q_idx, kv_idx))


def halo_mask(
    block: int, halo: int, grid: tuple[int, int], *, padded: bool = True, attend_padding: bool = False
) -> Mask:
    """HaloNet's mask over a flattened grid (queries: the ``h x w`` grid; keys: the grid padded by
    ``halo`` on every side when ``padded``): query ``(y, x)`` sees key ``(y', x')`` iff
    ``(y // b) b - halo <= y' < (y // b + 1) b + halo`` and the same in ``x``; without
    ``attend_padding``, only keys inside the image (:func:`attnjax.ops.halo_attention`'s reference).

    >>> halo_mask(2, 1, (4, 4), padded=False).materialize(16, 16)[0, 0, 0].reshape(4, 4).astype(int)
    Array([[1, 1, 1, 0],
           [1, 1, 1, 0],
           [1, 1, 1, 0],
           [0, 0, 0, 0]], dtype=int32)
    """
    h, w = grid
    pad = halo if padded else 0
    wp = w + 2 * pad

    def allowed(b_, h_, q_idx, kv_idx):
        qy, qx = q_idx // w, q_idx % w
        ky, kx = kv_idx // wp - pad, kv_idx % wp - pad
        ok = (
            (ky >= (qy // block) * block - halo)
            & (ky < (qy // block + 1) * block + halo)
            & (kx >= (qx // block) * block - halo)
            & (kx < (qx // block + 1) * block + halo)
        )
        if not attend_padding:
            ok = ok & (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
        return ok

    return from_fn(allowed)
