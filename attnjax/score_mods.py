"""Score modifications: ``(score, b, h, q_idx, kv_idx) -> score`` applied before the normalizer.

Score mods are pytrees: their arrays (ALiBi slopes, a relative-position table, a temperature)
are leaves, so gradients flow to them through every implementation, including the blockwise
ones whose backward pass is written by hand. They compose: ``compose(alibi(s), softcap(30.))``
applies ALiBi first, then the soft cap.

Positions are aligned bottom-right as in :mod:`attnjax.masks`: query ``i`` of ``T`` sits at
absolute position ``i + S - T``, so relative distances are ``kv_idx - (q_idx + S - T)``.

Example: the last of three queries against three keys, ALiBi slope 0.5 (``-0.5 * [2, 1, 0]``)
then a soft cap of 2 (``2 * tanh(x / 2)``):

>>> import jax.numpy as jnp
>>> from attnjax import score_mods
>>> mod = score_mods.compose(score_mods.alibi(jnp.array([0.5])), score_mods.softcap(2.0))
>>> s = jnp.zeros((1, 1, 1, 3))                              # [B, H, 1 query, 3 keys]
>>> b = h = jnp.zeros((1, 1, 1, 1), int)
>>> q, kv = jnp.full((1, 1, 1, 1), 2), jnp.arange(3)[None, None, None]
>>> mod(3, 3, s, b, h, q, kv).round(3)                      # q_len = kv_len = 3
Array([[[[-0.924, -0.49 ,  0.   ]]]], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from attnjax import _checks
from attnjax.core.pytree import pytree_dataclass
from attnjax.core.tiling import take


class ScoreMod:
    """Base class. ``__call__(q_len, kv_len, score, b, h, q_idx, kv_idx)`` returns new scores.

    ``score`` is float32 ``[B, H, Tq, Sk]`` (a tile or the whole matrix); the index arrays
    broadcast against it. ``q_len``/``kv_len`` are the full lengths (for alignment).
    """

    def __call__(self, q_len: int, kv_len: int, score, b, h, q_idx, kv_idx) -> Array:
        raise NotImplementedError

    def check(self, heads: int) -> None:
        """Raises ValueError if the mod's arrays do not fit ``heads`` query heads."""


def head_param(x, h) -> Array:
    """A scalar or per-head ``[H]`` parameter, broadcast against ``[B, H, T, S]`` scores (read
    with :func:`attnjax.core.tiling.take`, so a kernel loads the program's head, never gathers)."""
    x = x if np.ndim(x) == 0 else take(x, h)
    return jnp.asarray(x, jnp.float32)


@pytree_dataclass(data=("slopes",))
class Alibi(ScoreMod):
    slopes: Array  # [H]

    INDEXED: ClassVar = {"slopes": ("heads",)}

    def __call__(self, q_len, kv_len, score, b, h, q_idx, kv_idx):
        distance = jnp.abs(q_idx + (kv_len - q_len) - kv_idx).astype(jnp.float32)
        return score - head_param(self.slopes, h) * distance

    def check(self, heads):
        _checks.per_head("alibi slopes", self.slopes, heads)


@pytree_dataclass(data=("cap",))
class Softcap(ScoreMod):
    cap: Array

    def __call__(self, q_len, kv_len, score, b, h, q_idx, kv_idx):
        cap = jnp.asarray(self.cap, jnp.float32)
        return cap * jnp.tanh(score / cap)


@pytree_dataclass(data=("table",))
class RelativeBias(ScoreMod):
    table: Array  # [H, 2R + 1]: entry R + d is the bias at relative distance d = kv - q

    def __call__(self, q_len, kv_len, score, b, h, q_idx, kv_idx):
        radius = (self.table.shape[1] - 1) // 2
        distance = jnp.clip(kv_idx - (q_idx + (kv_len - q_len)), -radius, radius) + radius
        return score + self.table.astype(jnp.float32)[h, distance]

    def check(self, heads):
        shape = jnp.shape(self.table)
        if len(shape) != 2 or shape[0] != heads or shape[1] % 2 != 1:
            raise ValueError(
                f"relative_bias table must have shape [heads={heads}, 2 * max_distance + 1]; got {shape}"
            )


@pytree_dataclass(data=("t",))
class Temperature(ScoreMod):
    t: Array  # scalar or [H]

    INDEXED: ClassVar = {"t": ("heads",)}

    def __call__(self, q_len, kv_len, score, b, h, q_idx, kv_idx):
        return score / head_param(self.t, h)

    def check(self, heads):
        _checks.per_head("temperature", self.t, heads)


@pytree_dataclass(data=("params",), meta=("fn",))
class FromFn(ScoreMod):
    fn: Callable
    params: PyTree

    def __call__(self, q_len, kv_len, score, b, h, q_idx, kv_idx):
        if self.params is None:
            return self.fn(score, b, h, q_idx, kv_idx)
        return self.fn(self.params, score, b, h, q_idx, kv_idx)


@pytree_dataclass(data=("mods",))
class Compose(ScoreMod):
    mods: tuple[ScoreMod, ...]

    def __call__(self, q_len, kv_len, score, b, h, q_idx, kv_idx):
        for mod in self.mods:
            score = mod(q_len, kv_len, score, b, h, q_idx, kv_idx)
        return score

    def check(self, heads):
        for mod in self.mods:
            mod.check(heads)


def alibi(slopes: Float[Array, "H"]) -> ScoreMod:
    """ALiBi ("Train Short, Test Long"): ``score - slope_h * |pos(q) - kv|``.

    ``slopes`` is ``[H]`` (see :func:`alibi_slopes`). Under a causal mask this is the paper's
    ``slope_h * (kv - pos(q))``; without one it is the symmetric form.
    """
    return Alibi(jnp.asarray(slopes))


def alibi_slopes(num_heads: int) -> Float[Array, "H"]:
    """The ALiBi paper's geometric slopes ``2^(-8 i / n)``, extended to non-powers of two."""
    num_heads = _checks.positive_int("num_heads", num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < num_heads:  # interleave the slopes of the next power of two, as the paper does
        extra = 2.0 ** (-4.0 / closest)
        slopes += [extra ** (2 * i + 1) for i in range(num_heads - closest)]
    return jnp.asarray(np.array(slopes, np.float32))


def softcap(cap: float) -> ScoreMod:
    """Soft-capping (Gemma 2): ``cap * tanh(score / cap)``, bounding logits to ``(-cap, cap)``."""
    if isinstance(cap, (int, float)) and not cap > 0:
        raise ValueError(f"softcap cap must be > 0; got {cap}")
    return Softcap(jnp.asarray(cap, jnp.float32))


def relative_bias(table: Float[Array, "H R"]) -> ScoreMod:
    """Learnable relative-position bias: ``score + table[h, clip(kv - pos(q), -R, R) + R]``.

    ``table`` is ``[H, 2R + 1]``; distances beyond ``R`` share the edge entries.
    """
    table = jnp.asarray(table)
    _checks.check_float("relative_bias table", table)
    return RelativeBias(table)


def temperature(t: float | Float[Array, "H"]) -> ScoreMod:
    """Divides scores by a temperature ``t`` (scalar or per head ``[H]``)."""
    return Temperature(jnp.asarray(t, jnp.float32))


def from_fn(fn: Callable, params: PyTree = None) -> ScoreMod:
    """A score mod from a function.

    Without ``params``: ``fn(score, b, h, q_idx, kv_idx)``. With ``params`` (a pytree of arrays
    that should receive gradients, e.g. a learnable bias): ``fn(params, score, b, h, q_idx,
    kv_idx)``. Pass learnable arrays through ``params`` rather than closing over them: the
    blockwise implementations differentiate with respect to ``params`` explicitly. Indices are
    raw (``q_idx`` in ``[0, T)``, ``kv_idx`` in ``[0, S)``).
    """
    if not callable(fn):
        raise TypeError(f"score_mods.from_fn needs a callable; got {fn!r}")
    return FromFn(fn, params)


def compose(*mods: ScoreMod | Callable) -> ScoreMod:
    """Applies ``mods`` left to right. Plain callables are wrapped with :func:`from_fn`."""
    flat: list[ScoreMod] = []
    for mod in mods:
        mod = as_score_mod(mod)
        flat.extend(mod.mods if isinstance(mod, Compose) else (mod,))
    return Compose(tuple(flat))


def as_score_mod(mod) -> ScoreMod | None:
    """Normalizes the ``score_mod`` argument: None, a ScoreMod, a callable or a sequence."""
    if mod is None or isinstance(mod, ScoreMod):
        return mod
    if isinstance(mod, (list, tuple)):
        return compose(*mod)
    if callable(mod):
        return from_fn(mod)
    raise TypeError(f"score_mod must be a ScoreMod, a callable or a sequence of them; got {mod!r}")



# -- pairwise score functions and content-dependent relative logits (C3) ---------------------------


def _clip(idx, length: int):
    """Positions clipped into ``[0, length)``: tile padding may index past the end (those rows and
    keys are discarded or masked)."""
    return jnp.clip(idx, 0, length - 1)


@pytree_dataclass(data=("q_feats", "k_feats", "params"), meta=("fn", "replace"))
class Pairwise(ScoreMod):
    fn: Callable
    q_feats: Array  # [B, T, H, P]
    k_feats: Array  # [B, S, K, P]
    params: PyTree
    replace: bool

    def __call__(self, q_len, kv_len, score, b, h, q_idx, kv_idx):
        qf, kf = self.q_feats.astype(jnp.float32), self.k_feats.astype(jnp.float32)
        group = qf.shape[2] // kf.shape[2]
        # Gathered per tile: [B, H, t, 1, P] and [B, H, 1, s, P], so the function's hidden
        # activations are O(t s P), never O(T S P).
        qt = qf[b, _clip(q_idx, qf.shape[1]), h]
        kt = kf[b, _clip(kv_idx, kf.shape[1]), h // group]
        extra = jnp.asarray(self.fn(self.params, qt, kt), jnp.float32)
        return jnp.broadcast_to(extra, score.shape) if self.replace else score + extra

    def check(self, heads):
        qs, ks = jnp.shape(self.q_feats), jnp.shape(self.k_feats)
        if len(qs) != 4 or len(ks) != 4 or qs[2] != heads or heads % ks[2] or qs[0] != ks[0]:
            raise ValueError(f"pairwise features must be q_feats [batch, q_len, heads={heads}, P] and k_feats "
                             f"[batch, kv_len, K, P] with K dividing heads; got {qs} and {ks}")


def pairwise(fn: Callable, q_feats: Float[Array, "B T H P"], k_feats: Float[Array, "B S K P"],
             params: PyTree = None, *, replace: bool = False) -> ScoreMod:
    r"""A pairwise score function beyond ``q . k``, evaluated tile by tile (C3).

    ``fn(params, q_tile, k_tile)`` gets float32 ``q_tile [..., t, 1, P]`` and ``k_tile
    [..., 1, s, P]`` (the features of a tile's queries and keys, leading axes ``[B, H]``
    broadcasting; key head ``h // (H // K)`` for query head ``h``) and returns scores that
    broadcast to ``[..., t, s]``; they are added to the scores (or replace them with
    ``replace=True``). Inside the blockwise path only one tile's ``[t, s, hidden]`` activations
    exist at a time, and the online softmax is unchanged; the features and ``params`` get
    gradients through every implementation. A plain dot product is ``lambda p, a, b: (a * b).sum(-1)``.

    Positions index the features directly (``q_idx`` in ``[0, T)``); under a
    :class:`attnjax.ops.Shard` they are global, so pass the global features.

    >>> import jax, jax.numpy as jnp
    >>> qf = kf = jax.random.normal(jax.random.key(0), (1, 4, 2, 3))
    >>> mod = pairwise(lambda p, a, b: p * (a * b).sum(-1), qf, kf, jnp.float32(2.0))
    >>> idx = jnp.zeros((1, 1, 1, 1), int), jnp.arange(2)[None, :, None, None]
    >>> mod(4, 4, jnp.zeros((1, 2, 4, 4)), *idx, jnp.arange(4)[:, None], jnp.arange(4)[None]).shape
    (1, 2, 4, 4)
    """
    if not callable(fn):
        raise TypeError(f"score_mods.pairwise needs a callable; got {fn!r}")
    q_feats, k_feats = jnp.asarray(q_feats), jnp.asarray(k_feats)
    for name, x in (("q_feats", q_feats), ("k_feats", k_feats)):
        _checks.check_rank(name, x, ("batch", "len", "heads", "features"))
        _checks.check_float(name, x)
    return Pairwise(fn, q_feats, k_feats, params, bool(replace))


@pytree_dataclass(data=("table",), meta=("outside",))
class RelativeLogits(ScoreMod):
    table: Array  # [B, T, H, 2R + 1]
    outside: str

    def __call__(self, q_len, kv_len, score, b, h, q_idx, kv_idx):
        radius = (self.table.shape[-1] - 1) // 2
        delta = kv_idx - (q_idx + (kv_len - q_len))
        slot = jnp.clip(delta, -radius, radius) + radius
        r = self.table.astype(jnp.float32)[b, _clip(q_idx, self.table.shape[1]), h, slot]
        if self.outside == "zero":
            r = jnp.where(jnp.abs(delta) <= radius, r, 0.0)
        return score + r

    def check(self, heads):
        shape = jnp.shape(self.table)
        if len(shape) != 4 or shape[2] != heads or shape[3] % 2 != 1:
            raise ValueError(f"relative_logits table must have shape [batch, q_len, heads={heads}, 2R + 1]; "
                             f"got {shape}")


def relative_logits(table: Float[Array, "B T H W"], *, outside: str = "clip") -> ScoreMod:
    r"""Content-dependent relative logits from a per-query table (C3's companion trick):
    ``score + table[b, i, h, R + clip(j - pos(i), -R, R)]``, ``W = 2R + 1``.

    ``table[b, i, h, R + d] = q_i . r_d`` is computed once, ``O(T W D)`` (HaloNet, Transformer-XL /
    RCMHA, MVPA), and read by offset inside each tile: no ``[T, S]`` array. Positions are
    aligned bottom-right (``pos(i) = i + S - T``). ``outside="clip"`` lets offsets beyond ``R``
    share the edge entries; ``"zero"`` adds nothing for them.

    >>> import jax.numpy as jnp
    >>> table = jnp.arange(3.0).reshape(1, 1, 1, 3)          # offsets -1, 0, +1
    >>> mod = relative_logits(jnp.broadcast_to(table, (1, 2, 1, 3)))
    >>> z = jnp.zeros((1, 1, 1, 1), int)
    >>> mod(2, 2, jnp.zeros((1, 1, 2, 2)), z, z, jnp.arange(2)[:, None], jnp.arange(2)[None])[0, 0]
    Array([[1., 2.],
           [0., 1.]], dtype=float32)
    """
    table = jnp.asarray(table)
    _checks.check_rank("relative_logits table", table, ("batch", "q_len", "heads", "offsets"))
    _checks.check_float("relative_logits table", table)
    if outside not in ("clip", "zero"):
        raise ValueError(f"outside must be 'clip' or 'zero'; got {outside!r}")
    return RelativeLogits(table, outside)


# -- per-head logit boost on a key set (training-free head modulation; issue 22) -----------------


@pytree_dataclass(data=("selected", "log_gamma"))
class KeySetBias(ScoreMod):
    selected: Array  # [B, S] float32 0/1 (a float leaf: the blockwise backward adds cotangents of every leaf)
    log_gamma: Array  # scalar or [H]

    def __call__(self, q_len, kv_len, score, b, h, q_idx, kv_idx):
        on = self.selected[b, _clip(kv_idx, self.selected.shape[1])] > 0.5
        return score + jnp.where(on, head_param(self.log_gamma, h), 0.0)

    def check(self, heads):
        _checks.per_head("log_gamma", self.log_gamma, heads)


def key_set_bias(selected, gamma) -> ScoreMod:
    r"""``score + log(gamma_h)`` for the keys in ``selected`` (``[B, S]`` booleans): multiplies the
    unnormalized softmax weight of those keys by ``gamma_h`` per head (training-free modulation of
    attention to, e.g., the image tokens of a vision-language model; ``gamma = 1`` is the identity).

    >>> import jax.numpy as jnp
    >>> mod = key_set_bias(jnp.array([[True, False]]), jnp.e)
    >>> z = jnp.zeros((1, 1, 1, 1), int)
    >>> mod(1, 2, jnp.zeros((1, 1, 1, 2)), z, z, z, jnp.arange(2)[None, None, None]).tolist()
    [[[[1.0, 0.0]]]]
    """
    selected = jnp.asarray(selected)
    _checks.check_rank("selected", selected, ("batch", "kv_len"))
    return KeySetBias(selected.astype(bool).astype(jnp.float32), jnp.log(jnp.asarray(gamma, jnp.float32)))


# -- 2-D relative position biases (zoo part 1: CrossFormer DPB, GC ViT, VSA, BoxRPB) -----------


@pytree_dataclass(data=("table",), meta=("grid",))
class RelativeBias2D(ScoreMod):
    table: Array  # [H, 2a - 1, 2b - 1]: entry (a - 1 + dy, b - 1 + dx) is the bias at offset (dy, dx)
    grid: tuple[int, int]

    def __call__(self, q_len, kv_len, score, b, h, q_idx, kv_idx):
        a, w = self.grid
        dy = kv_idx // w - q_idx // w + a - 1
        dx = kv_idx % w - q_idx % w + w - 1
        return score + self.table.astype(jnp.float32)[h, dy, dx]

    def check(self, heads):
        a, w = self.grid
        if jnp.shape(self.table) != (heads, 2 * a - 1, 2 * w - 1):
            raise ValueError(f"relative_bias_2d table must have shape [heads={heads}, 2a-1={2 * a - 1}, "
                             f"2b-1={2 * w - 1}] for grid {self.grid}; got {jnp.shape(self.table)}")


@pytree_dataclass(data=("row", "col"), meta=("width",))
class SeparableBias(ScoreMod):
    row: Array  # [B | 1, T | 1, R, H]: bias of key row kv // width
    col: Array  # [B | 1, T | 1, width, H]: bias of key column kv % width
    width: int

    def __call__(self, q_len, kv_len, score, b, h, q_idx, kv_idx):
        pick = lambda t, i: i if t.shape[0] > 1 else 0
        row, col = self.row.astype(jnp.float32), self.col.astype(jnp.float32)
        r = row[pick(row, b), q_idx if row.shape[1] > 1 else 0, kv_idx // self.width, h]
        c = col[pick(col, b), q_idx if col.shape[1] > 1 else 0, kv_idx % self.width, h]
        return score + r + c

    def check(self, heads):
        for name, t in (("row", self.row), ("col", self.col)):
            if jnp.ndim(t) != 4 or jnp.shape(t)[-1] != heads:
                raise ValueError(f"separable_bias {name} must have shape [B or 1, T or 1, n, heads={heads}]; "
                                 f"got {jnp.shape(t)}")
        if jnp.shape(self.col)[2] != self.width:
            raise ValueError(f"separable_bias col has {jnp.shape(self.col)[2]} columns; width is {self.width}")


def relative_bias_2d(table: Float[Array, "H A B"], grid: int | tuple[int, int]) -> ScoreMod:
    """Swin-style 2-D relative position bias over a ``grid = (a, b)`` of tokens (row-major):
    ``score + table[h, a - 1 + dy, b - 1 + dx]`` with ``(dy, dx)`` the key's offset from the query
    on the grid (raw indices: the tokens of a window, not bottom-right aligned).

    ``table`` is ``[H, 2a - 1, 2b - 1]``; it is a differentiable leaf, so it may be produced by a
    network on every call (CrossFormer's dynamic position bias) and receive gradients.

    >>> import jax.numpy as jnp
    >>> from attnjax import score_mods
    >>> table = jnp.arange(9.0).reshape(1, 3, 3)   # grid 2 x 2: offsets in {-1, 0, 1}^2
    >>> mod = score_mods.relative_bias_2d(table, 2)
    >>> i = jnp.arange(4)
    >>> mod(4, 4, jnp.zeros((1, 1, 4, 4)), 0, 0, i[:, None], i[None])[0, 0, 0]   # query (0, 0)
    Array([4., 5., 7., 8.], dtype=float32)
    """
    grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if len(grid) != 2:
        raise ValueError(f"relative_bias_2d grid must be an int or a pair; got {grid}")
    a, w = (_checks.positive_int("relative_bias_2d grid", g) for g in grid)
    table = jnp.asarray(table)
    _checks.check_float("relative_bias_2d table", table)
    if table.ndim != 3 or table.shape[1:] != (2 * a - 1, 2 * w - 1):
        raise ValueError(f"relative_bias_2d table must have shape [H, {2 * a - 1}, {2 * w - 1}] for grid {(a, w)}; "
                         f"got {table.shape}")
    return RelativeBias2D(table, (a, w))


def separable_bias(row: Float[Array, "B T R H"], col: Float[Array, "B T W H"], width: int) -> ScoreMod:
    """A per-query bias that factorizes over the key's row and column on a ``[R, width]`` grid:
    ``score[b, h, i, j] + row[b, i, j // width, h] + col[b, i, j % width, h]``.

    ``row`` is ``[B or 1, T or 1, R, H]``, ``col`` ``[B or 1, T or 1, width, H]`` (differentiable
    leaves): ``O(T (R + width) H)`` numbers instead of a ``[T, R width]`` bias (BoxRPB's box-to-pixel
    bias, HaloNet-style factorized relative logits).

    >>> import jax.numpy as jnp
    >>> from attnjax import score_mods
    >>> row = jnp.array([0.0, 10.0]).reshape(1, 1, 2, 1)
    >>> col = jnp.array([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1)
    >>> mod = score_mods.separable_bias(row, col, width=3)
    >>> mod(1, 6, jnp.zeros((1, 1, 1, 6)), 0, 0, jnp.zeros((1, 1), int), jnp.arange(6)[None])[0, 0, 0]
    Array([ 1.,  2.,  3., 11., 12., 13.], dtype=float32)
    """
    width = _checks.positive_int("separable_bias width", width)
    row, col = jnp.asarray(row), jnp.asarray(col)
    for name, t in (("row", row), ("col", col)):
        _checks.check_float(f"separable_bias {name}", t)
        if t.ndim != 4:
            raise ValueError(f"separable_bias {name} must have shape [B or 1, T or 1, n, heads]; got {t.shape}")
    if col.shape[2] != width:
        raise ValueError(f"separable_bias col has {col.shape[2]} columns; width is {width}")
    return SeparableBias(row, col, width)
