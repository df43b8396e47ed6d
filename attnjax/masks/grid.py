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
