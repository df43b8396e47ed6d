r"""Multi-axis attention ("MaxViT: Multi-Axis Vision Transformer", Tu et al., ECCV 2022).

Two sparse softmax attentions over a 2-D grid of ``h x w`` tokens, each a partition of the grid
into groups that attend only within themselves:

* **block** (local): windows of ``p_h x p_w`` adjacent tokens; token ``(y, x)`` sees ``(y', x')``
  iff ``y // p_h == y' // p_h`` and ``x // p_w == x' // p_w``;
* **grid** (dilated, global): a fixed ``g_h x g_w`` grid of tokens spread over the whole image
  with stride ``(h / g_h, w / g_w)``; ``(y, x)`` sees ``(y', x')`` iff
  ``y % (h / g_h) == y' % (h / g_h)`` and ``x % (w / g_w) == x' % (w / g_w)``.

.. math::

    O = \mathrm{softmax}\big(\mathrm{scale}\, Q K^\top + M\big) V, \qquad
    M_{ij} = 0 \text{ if } i, j \text{ share a block (grid group)}, \ -\infty \text{ otherwise}

The efficient path reshapes the grid into its groups (``[B * groups, group_size, H, D]``) and
runs :func:`attnjax.ops.attention` on them: ``O(h w P)`` for groups of ``P`` tokens instead of
``O((h w)^2)``. The reference is :func:`attnjax.ops.attention` over the flattened grid with the
equivalent mask (:func:`block_mask` / :func:`grid_mask`), so the tests prove the reshape equals
the masked dense attention. Grid sides must be multiples of the window / grid (as in MaxViT,
which pads its inputs).

Letter legend: B batch, (h, w) grid, H query heads, K key/value heads, D head dim, E value dim.
"""

from __future__ import annotations


from jaxtyping import Array, Float

from attnjax import _checks, score_mods
from attnjax.score_mods import ScoreMod, as_score_mod
from attnjax.masks.grid import block_mask, grid_mask, pair
from attnjax.core import dispatch
from attnjax.ops.attention.api import attention
from attnjax.core.dispatch import Implementation


def _to_blocks(x: Array, ph: int, pw: int) -> Array:
    """``[B, h, w, H, D] -> [B * (h/ph) * (w/pw), ph * pw, H, D]`` (windows of adjacent tokens)."""
    B, h, w, H, D = x.shape
    x = x.reshape(B, h // ph, ph, w // pw, pw, H, D).transpose(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(-1, ph * pw, H, D)


def _from_blocks(x: Array, B: int, h: int, w: int, ph: int, pw: int) -> Array:
    H, E = x.shape[-2:]
    x = x.reshape(B, h // ph, w // pw, ph, pw, H, E).transpose(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(B, h, w, H, E)


def _to_grid(x: Array, gh: int, gw: int) -> Array:
    """``[B, h, w, H, D] -> [B * (h/gh) * (w/gw), gh * gw, H, D]``: each group holds the tokens
    with one offset ``(y % (h/gh), x % (w/gw))``."""
    B, h, w, H, D = x.shape
    x = x.reshape(B, gh, h // gh, gw, w // gw, H, D).transpose(0, 2, 4, 1, 3, 5, 6)
    return x.reshape(-1, gh * gw, H, D)


def _from_grid(x: Array, B: int, h: int, w: int, gh: int, gw: int) -> Array:
    H, E = x.shape[-2:]
    x = x.reshape(B, h // gh, w // gw, gh, gw, H, E).transpose(0, 3, 1, 4, 2, 5, 6)
    return x.reshape(B, h, w, H, E)


def _local_index(name, h, w, a, b):
    """Flat grid index -> the token's index inside its group (row-major over the group's
    ``a x b`` tokens), as the grouped path numbers them."""
    if name == "block_attention":
        return lambda i: (i // w % a) * b + i % w % b
    return lambda i: (i // w // (h // a)) * b + i % w // (w // b)


def _multi_axis(name, q, k, v, size, mask_fn, to, back, scale, implementation, score_mod=None):
    B, h, w, H, D = _checks.check_rank("q", q, ("batch", "height", "width", "heads", "head_dim"))
    for n, x in (("k", k), ("v", v)):
        shape = _checks.check_rank(n, x, ("batch", "height", "width", "kv_heads", "head_dim"))
        if shape[:3] != (B, h, w):
            raise ValueError(f"{n} has shape {shape}; its grid [batch, height, width] must be q's {(B, h, w)}")
    a, b = pair("window" if name == "block_attention" else "grid", size)
    mask = mask_fn((h, w), (a, b))  # validates divisibility
    flat = lambda x: x.reshape(B, h * w, *x.shape[3:])

    mod = as_score_mod(score_mod)
    if mod is not None:
        mod.check(q.shape[3])
    local = _local_index(name, h, w, a, b)
    # the reference sees flat grid indices: renumber them as the grouped path does, so a score mod
    # written for one group (a 2-D relative bias) means the same on both paths
    ref_mod = None if mod is None else score_mods.from_fn(
        lambda m, s, b_, h_, qi, ki: m(a * b, a * b, s, b_, h_, local(qi), local(ki)), mod)

    def reference():
        out = attention(flat(q), flat(k), flat(v), mask=mask, score_mod=ref_mod, scale=scale,
                        implementation="reference")
        return out.reshape(B, h, w, *out.shape[2:])

    def grouped(impl):
        def run():
            out = attention(to(q, a, b), to(k, a, b), to(v, a, b), score_mod=mod, scale=scale, implementation=impl)
            return back(out, B, h, w, a, b)
        return run

    impls = {"reference": reference, "xla": grouped("xla"), "pallas": grouped("pallas")}
    return dispatch.run(name, impls, implementation)


def block_attention(
    q: Float[Array, "B h w H D"],
    k: Float[Array, "B h w K D"],
    v: Float[Array, "B h w K E"],
    *,
    window: int | tuple[int, int],
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B h w H E"]:
    r"""MaxViT block attention: softmax attention within non-overlapping ``window`` windows.

    ``O(h w p_h p_w)`` for windows of ``p_h x p_w`` (``window`` divides the grid on each axis).
    ``implementation``: ``"reference"`` (dense over the flattened grid with :func:`block_mask`),
    ``"xla"`` / ``"pallas"`` (windows as a batch, through :func:`attnjax.ops.attention`), ``None``
    or a sequence. Arguments otherwise as :func:`attnjax.ops.attention` (GQA allowed).
    ``score_mod`` sees each window's own token indices (row-major in the window, ``q_len =
    kv_len = p_h p_w``) on every path, e.g. :func:`attnjax.score_mods.relative_bias_2d` with
    ``grid=window`` (Swin / CrossFormer); the same holds for :func:`grid_attention`'s groups.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 8, 12, 2, 4))
    >>> out = ops.block_attention(q, k, v, window=4)
    >>> ref = ops.block_attention(q, k, v, window=4, implementation="reference")
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
    ((1, 8, 12, 2, 4), True)
    """
    return _multi_axis("block_attention", q, k, v, window, block_mask, _to_blocks, _from_blocks, scale,
                       implementation, score_mod)


def grid_attention(
    q: Float[Array, "B h w H D"],
    k: Float[Array, "B h w K D"],
    v: Float[Array, "B h w K E"],
    *,
    grid: int | tuple[int, int],
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B h w H E"]:
    r"""MaxViT grid attention: softmax attention among the ``g_h x g_w`` tokens spread over the
    image with stride ``(h / g_h, w / g_w)`` (sparse, dilated, global mixing).

    ``O(h w g_h g_w)``; ``grid`` divides the grid on each axis. ``implementation`` as in
    :func:`block_attention` (reference mask: :func:`grid_mask`).

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 8, 12, 2, 4))
    >>> out = ops.grid_attention(q, k, v, grid=(2, 3))
    >>> ref = ops.grid_attention(q, k, v, grid=(2, 3), implementation="reference")
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
    ((1, 8, 12, 2, 4), True)
    """
    return _multi_axis("grid_attention", q, k, v, grid, grid_mask, _to_grid, _from_grid, scale, implementation,
                       score_mod)
