"""Tiling: what every blockwise implementation (xla, the Pallas kernels) shares.

A problem (:class:`Problem`: sizes, scale, mask, score mod, normalizer, dropout, shard) is cut
into tiles; a mask's block map classifies each tile as ``EMPTY``, ``PARTIAL`` or ``FULL``; the
non-empty tiles of each row (or column) are compacted into a visit list; each visited tile's
logits, mask and dropout are evaluated by the functions below, and the online softmax folds it in.

Letter legend (used in every shape comment of attnjax): B batch, T query length, S key length,
H query heads, K key/value heads (K divides H; G = H // K queries share a key head),
D query/key head dim, E value head dim.

The logits of a tile are computed by one function, :func:`logits`, for the dense reference
(one tile covering everything), the blockwise XLA path and its hand-written backward (through
``jax.vjp`` of this same function), so the three cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int8

from attnjax.core.pytree import pytree_dataclass
from attnjax.core.utils import precision, round_up

if TYPE_CHECKING:  # the layers above core; core imports nothing from them
    from attnjax.dropout import Dropout
    from attnjax.masks import Mask
    from attnjax.normalizers import Normalizer
    from attnjax.score_mods import ScoreMod

EMPTY, PARTIAL, FULL = 0, 1, 2
"""Tile classes in a block map."""


# ---------------------------------------------------------------------------------------------
# Arrays of masks, score mods and dropout, read the same way by every implementation.


class KernelLeaf:
    """An array of a mask, score mod or dropout inside a Pallas kernel: a reference to the whole
    array in memory, read only through :func:`take`, one load of the block a tile needs. Classes
    declare such fields in ``INDEXED`` (field name -> the kind of each axis: ``"batch"``,
    ``"heads"``, ``"q"``, ``"kv"`` or ``None``), so a kernel can pad their position axes."""

    def __init__(self, ref, shape: tuple[int, ...]):
        self.ref, self.shape = ref, tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)


def take(x, *index):
    """``x[index]`` for the per-batch, per-head or per-position arrays of masks, score mods and
    dropout: the one way their code reads them, so kernels never gather.

    Each index is a Python int, an index array holding one value (a batch element or head,
    shaped to broadcast like the scores) or an array of consecutive positions (a tile's queries or
    keys, broadcasting like the scores). A plain array is indexed as numpy would; a
    :class:`KernelLeaf` is read with one load of the block the indices cover (the positions'
    first value and count), shaped like numpy's answer.
    """
    if not isinstance(x, KernelLeaf):
        return x[index]
    from jax.experimental import pallas as pl  # only kernels build KernelLeaf

    ref_index = []
    for i in index:
        if isinstance(i, int):
            ref_index.append(i)
        elif jnp.size(i) == 1:
            ref_index.append(jnp.max(i))  # a reduction, not a slice: Triton lowers it
        else:
            ref_index.append(pl.ds(jnp.min(i), jnp.size(i)))
    shape = jnp.broadcast_shapes(*(jnp.shape(i) for i in index if not isinstance(i, int)))
    return x.ref[tuple(ref_index)].reshape(shape)


@dataclasses.dataclass(frozen=True)
class Dims:
    """Static sizes of one attention problem."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    v_dim: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


@pytree_dataclass(data=("batch_offset", "head_offset", "q_offset", "kv_offset", "head_ids"),
                  meta=("batch", "heads", "q_len", "kv_len"))
class Shard:
    """Where a call's ``q``/``k``/``v`` sit inside a larger attention problem.

    A sharded computation (``attnjax.parallel``) calls an op on pieces: a device's batch
    elements and heads, its block of queries, the block of keys it holds at this step of a ring.
    Given a ``Shard``, masks, score mods and dropout see the *global* sizes ``batch``, ``heads``,
    ``q_len``, ``kv_len`` and the global indices ``offset + local index``, so every piece computes
    exactly its part of the unsharded answer (same mask alignment, ALiBi distances, dropped
    weights). Mask and score-mod arrays (segment ids, slopes, tables) are global, not sliced.
    Offsets are int32 scalars and may be traced (e.g. from ``lax.axis_index``).

    Heads that are not one contiguous run (MoA's span groups gather any subset of heads) are
    given by ``head_ids``, int32 ``[local heads]``: local head ``h`` is global head
    ``head_offset + head_ids[h]``; block maps are then taken for those heads only.
    """

    batch: int
    heads: int
    q_len: int
    kv_len: int
    batch_offset: Array
    head_offset: Array
    q_offset: Array
    kv_offset: Array
    head_ids: Array | None = None

    @classmethod
    def make(cls, *, batch: int, heads: int, q_len: int, kv_len: int,
             batch_offset=0, head_offset=0, q_offset=0, kv_offset=0, head_ids=None) -> "Shard":
        """A shard of a problem with these global sizes, at these offsets (ints or int arrays),
        with these heads (``head_ids``, optional)."""
        i32 = lambda x: jnp.asarray(x, jnp.int32)
        return cls(batch, heads, q_len, kv_len, i32(batch_offset), i32(head_offset), i32(q_offset),
                   i32(kv_offset), None if head_ids is None else i32(head_ids))

    def global_heads(self, h: Array) -> Array:
        """Global head indices of local head indices ``h``."""
        return self.head_offset + (h if self.head_ids is None else self.head_ids[h])


@pytree_dataclass(data=("mask", "score_mod", "normalizer", "dropout", "shard"), meta=("dims", "scale"))
class Problem:
    """Everything but q, k, v and a dense bias: what to compute.

    A pytree: ``dims`` and ``scale`` are static; ``mask``, ``score_mod``, ``normalizer``,
    ``dropout`` and ``shard`` are pytrees whose arrays may be traced and differentiated (a
    ``custom_vjp`` returns the cotangent of a problem as a problem with ``None`` where nothing
    is differentiable)."""

    dims: Dims
    scale: float
    mask: Mask | None
    score_mod: ScoreMod | None
    normalizer: Normalizer
    dropout: Dropout | None = None
    shard: Shard | None = None

    @property
    def lengths(self) -> tuple[int, int]:
        """``(q_len, kv_len)`` of the whole problem (the global ones for a shard)."""
        if self.shard is None:
            return self.dims.q_len, self.dims.kv_len
        return self.shard.q_len, self.shard.kv_len

    @property
    def global_batch(self) -> int:
        return self.dims.batch if self.shard is None else self.shard.batch


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile sizes of one blockwise computation (static; a ``custom_vjp`` non-differentiable arg)."""

    block_q: int
    block_k: int


def tile_plan(problem: Problem, block_q: int, block_k: int) -> Int8[Array, "nq nk"]:
    """The tile classes of a problem, ``[ceil(T / block_q), ceil(S / block_k)]`` int8, reduced
    over batch and heads. A last key tile that sticks out of the keys is at most PARTIAL (its
    padding must be masked); padding the arrays to whole tiles is the caller's."""
    d, sh = problem.dims, problem.shard
    s_pad = round_up(d.kv_len, block_k) - d.kv_len
    if problem.mask is None:
        nq, nk = -(-d.q_len // block_q), -(-d.kv_len // block_k)
        classes = jnp.full((1, 1, nq, nk), FULL, jnp.int8)
    else:
        window = None if sh is None else (sh.q_offset, d.q_len, sh.kv_offset, d.kv_len)
        classes = problem.mask.block_map(*problem.lengths, block_q, block_k,
                                         batch=problem.global_batch, window=window)
    if sh is not None and sh.head_ids is not None and classes.shape[1] > 1:
        classes = classes[:, sh.global_heads(jnp.arange(d.heads))]  # this call's heads only
    classes = collapse(classes, pad_kv=s_pad > 0)
    if sh is not None:
        classes = _outside_keys(classes, sh, block_k, d.kv_len)
    return classes


def _outside_keys(classes, shard: Shard, block_k: int, kv_count: int):
    """A shard's keys may stick out of the global sequence (the zero-filled halo of a device at
    the edge): tiles entirely outside become EMPTY, tiles partly outside at most PARTIAL."""
    lo = shard.kv_offset + jnp.arange(classes.shape[1], dtype=jnp.int32) * block_k
    hi = jnp.minimum(lo + block_k, shard.kv_offset + kv_count) - 1
    outside = (hi < 0) | (lo >= shard.kv_len)
    straddles = ~outside & ((lo < 0) | (hi >= shard.kv_len))
    classes = jnp.where(outside[None, :], EMPTY, classes)
    return jnp.where(straddles[None, :] & (classes == FULL), PARTIAL, classes).astype(jnp.int8)


def visit(count, tile_of, is_full, body, init):
    """The visit loop of every blockwise path: ``body(tile, masked, carry)`` over the ``count``
    tiles ``tile_of(0), tile_of(1), ...`` of a compacted list, mask-free on FULL tiles."""

    def step(j, carry):
        t = tile_of(j)
        return lax.cond(is_full(t), functools.partial(body, t, False), functools.partial(body, t, True), carry)

    return lax.fori_loop(0, count, step, init)


def visit_all(n: int, count, tile_of, is_full, body, init):
    """:func:`visit` as a ``lax.scan`` over a static ``n >= count`` steps, the steps past
    ``count`` skipped by ``lax.cond``: reverse-differentiable (``fori_loop`` with a traced trip
    count is a ``while_loop``, which is not), at the price of ``n - count`` empty steps and, when
    differentiated, of keeping every visited tile's intermediates."""

    def step(carry, j):
        t = tile_of(j)
        run = lambda c: lax.cond(is_full(t), functools.partial(body, t, False), functools.partial(body, t, True), c)
        return lax.cond(j < count, run, lambda c: c, carry), None

    return lax.scan(step, init, jnp.arange(n))[0]


def compact(classes: Array):
    """Per row of ``classes``: ``order`` lists the non-empty columns first, in increasing order
    (then the rest), and ``counts`` says how many there are."""
    nonempty = classes != EMPTY
    order = jnp.argsort(~nonempty, axis=1, stable=True).astype(jnp.int32)
    return order, nonempty.sum(1, dtype=jnp.int32)


def collapse(block_map: Int8[Array, "b h nq nk"], pad_kv: bool = False) -> Int8[Array, "nq nk"]:
    """Reduces a block map over batch and heads: a tile is EMPTY/FULL only if it is for all.

    ``pad_kv`` marks the last key tile PARTIAL where FULL: a padded tile must be masked.
    """
    all_empty = (block_map == EMPTY).all((0, 1))
    all_full = (block_map == FULL).all((0, 1))
    classes = jnp.where(all_empty, EMPTY, jnp.where(all_full, FULL, PARTIAL)).astype(jnp.int8)
    if pad_kv:
        last = classes[:, -1]
        classes = classes.at[:, -1].set(jnp.where(last == FULL, PARTIAL, last).astype(jnp.int8))
    return classes


def scores(q: Float[Array, "B t H D"], k: Float[Array, "B s K D"], scale: float, heads_first: bool = False) -> Array:
    """Scaled dot products in float32, ``[B, H, t, s]``, without repeating K/V heads for GQA.

    ``heads_first``: ``q`` is ``[B, H, t, D]`` and ``k`` ``[B, K, s, D]`` (the blockwise XLA
    path's layout): the products are then one batched matmul per key head, the ``G`` query heads
    that share it stacked into its rows, with no transpose of any operand or result."""
    if heads_first:
        B, H, t, D = q.shape
        K, s_len = k.shape[1], k.shape[2]
        s = lax.dot_general(q.reshape(B, K, (H // K) * t, D), k, (((3,), (3,)), ((0, 1), (0, 1))),
                            precision=precision(q.dtype), preferred_element_type=jnp.float32)
        s = s.reshape(B, H, t, s_len)
        return s if scale == 1.0 else s * scale
    B, t, H, D = q.shape
    K = k.shape[2]
    qg = q.reshape(B, t, K, H // K, D)
    s = jnp.einsum(
        "btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32, precision=precision(q.dtype)
    )
    return s.reshape(B, H, t, k.shape[1]) * scale


def weighted_values(w: Float[Array, "B H t s"], v: Float[Array, "B s K E"], heads_first: bool = False) -> Array:
    """``w @ v`` per head in float32, ``[B, H, t, E]`` (``heads_first``: ``v`` is ``[B, K, s, E]``)."""
    B, H, t, s = w.shape
    if heads_first:
        K, E = v.shape[1], v.shape[3]
        out = lax.dot_general(w.reshape(B, K, (H // K) * t, s), v, (((3,), (2,)), ((0, 1), (0, 1))),
                              precision=precision(v.dtype), preferred_element_type=jnp.float32)
        return out.reshape(B, H, t, E)
    K = v.shape[2]
    wg = w.reshape(B, K, H // K, t, s)
    out = jnp.einsum(
        "bkgts,bske->bkgte", wg, v, preferred_element_type=jnp.float32, precision=precision(v.dtype)
    )
    return out.reshape(B, H, t, v.shape[-1])


def index_arrays(problem: Problem, q_idx: Array, kv_idx: Array, bh=None):
    """Broadcasting global index arrays ``b, h, q, kv`` for a tile at local positions
    ``q_idx``/``kv_idx`` (shifted by the problem's :class:`Shard` offsets, if any).

    ``bh=(b, h)`` gives scalar batch/head indices (a kernel instance's program ids); by default
    every batch element and head is covered.
    """
    d = problem.dims
    if bh is None:
        b = jnp.arange(d.batch, dtype=jnp.int32)[:, None, None, None]
        h = jnp.arange(d.heads, dtype=jnp.int32)[None, :, None, None]
    else:
        b, h = (jnp.reshape(x, (1, 1, 1, 1)).astype(jnp.int32) for x in bh)
    q, kv = q_idx[None, None, :, None], kv_idx[None, None, None, :]
    sh = problem.shard
    if sh is not None:
        b, h, q, kv = b + sh.batch_offset, sh.global_heads(h), q + sh.q_offset, kv + sh.kv_offset
    return b, h, q, kv


def modify(problem: Problem, score_mod: ScoreMod | None, s: Array, q_idx, kv_idx, bh=None) -> Array:
    """Applies ``score_mod`` to float32 scores ``s`` (``[B|1, H|1, t, s]``)."""
    if score_mod is None:
        return s
    return score_mod(*problem.lengths, s, *index_arrays(problem, q_idx, kv_idx, bh))


def logits(
    problem: Problem,
    score_mod: ScoreMod | None,
    q: Array,
    k: Array,
    bias: Array | None,
    q_idx: Array,
    kv_idx: Array,
    heads_first: bool = False,
) -> Float[Array, "B H t s"]:
    """Logits of a tile: ``score_mod(scale * q k^T + bias)``, float32.

    ``score_mod`` is passed separately from ``problem`` so callers can differentiate it;
    ``heads_first`` is :func:`scores`'.
    """
    return modified_scores(problem, score_mod, scores(q, k, problem.scale, heads_first), bias, q_idx, kv_idx)


def modified_scores(problem: Problem, score_mod: ScoreMod | None, s: Array, bias: Array | None,
                    q_idx: Array, kv_idx: Array) -> Float[Array, "B H t s"]:
    """What :func:`logits` does after the products ``s``: ``score_mod(s + bias)``, float32
    (a backward that differentiates the products by hand differentiates this part alone)."""
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    return modify(problem, score_mod, s, q_idx, kv_idx)


def allowed(problem: Problem, q_idx: Array, kv_idx: Array, bh=None) -> Array:
    """Which entries of a tile are attended: the mask, and keys inside the real sequence."""
    valid = kv_idx[None, None, None, :] < problem.dims.kv_len
    indices = index_arrays(problem, q_idx, kv_idx, bh)
    if problem.shard is not None:  # a shard's keys may stick out of the global sequence
        valid = valid & (indices[3] >= 0) & (indices[3] < problem.shard.kv_len)
    if problem.mask is None:
        return valid
    return valid & problem.mask.predicate(*problem.lengths, *indices)


def finite_or_zero(x: Array, keepdims: bool = False) -> tuple[Array, Array]:
    """``(x with its non-finite entries zeroed, poison)``, ``poison`` float32 of shape
    ``x.shape[:-1]`` (``keepdims``: ``x.shape[:-1] + (1,)``, a column, as Mosaic's 2-D layouts
    need): 0 where the row ``x[..., :]`` is finite, NaN where it is not.

    The two halves of confining a non-finite input to the entries the mask allows (see
    :func:`guard`): the clean ``x`` goes into products, where a masked entry's weight 0 times a
    finite number is 0 (``0 * NaN`` would be NaN), and the poison goes into the logits, where
    the mask then removes it from masked entries and keeps it (NaN) in allowed ones."""
    return _zero_non_finite(x), _poison(x, keepdims)


def _poison(x: Array, keepdims: bool = False) -> Array:
    # A sum of 0 / NaN, not ``isfinite(x).all(-1)``: Triton kernels have no boolean reduction.
    return jnp.where(_isfinite(x), 0.0, jnp.nan).astype(jnp.float32).sum(-1, keepdims=keepdims)


def _isfinite(x: Array) -> Array:
    # Mosaic (TPU kernels) takes is_finite of float32 only; upcasting 16-bit floats is exact.
    return jnp.isfinite(x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 else x)


def zero_non_finite(*xs: Array) -> tuple[Array, ...]:
    """Each of ``xs`` with its non-finite entries zeroed: the ``q, k, v`` of a PARTIAL tile's
    *backward* in a blockwise path with a hand-written backward (xla, the Pallas kernels; see
    :func:`poison_keys`). FULL tiles keep the raw inputs: nothing there is masked."""
    return tuple(_zero_non_finite(x) for x in xs)


@jax.custom_jvp
def _zero_non_finite(x):
    return jnp.where(_isfinite(x), x, jnp.zeros((), x.dtype))


@_zero_non_finite.defjvp
def _zero_non_finite_jvp(primals, tangents):
    # The identity's derivative: exact at finite entries, and a gradient "at" a NaN input means
    # nothing. Unlike where's (a select by a saved mask), it costs the backward nothing.
    (x,), (t,) = primals, tangents
    return _zero_non_finite(x), t


def guard(q: Float[Array, "B t H D"], k: Float[Array, "B s K D"], v: Float[Array, "B s K E"]):
    """Non-finite inputs of a tile with masked entries, for code differentiated by autodiff (the
    dense references, neighborhood attention's xla path): returns ``(q, k, v, poison)`` with
    non-finite entries of ``q``, ``k``, ``v`` zeroed and ``poison`` ``[B, H, t, s]`` (broadcast
    shape), NaN wherever query row ``t`` or key/value row ``s`` held a non-finite entry, else 0.
    Add it to the logits *after* the score mod (which so sees, and is differentiated at, finite
    scores only) and *before* masking.

    Then a masked entry contributes exactly nothing, forward or backward, whatever its query, key
    or value holds (``0 * NaN`` never happens), while an allowed entry with a non-finite input gets
    a NaN logit, so the query that attends it still gets NaN (garbage in, garbage out, visible).
    Blockwise paths with a hand-written backward need less (:func:`poison_keys`)."""
    q, pq = finite_or_zero(q)  # [B, t, H]
    k, pk = finite_or_zero(k)  # [B, s, K]
    v, pv = finite_or_zero(v)
    G = q.shape[2] // k.shape[2]
    pkv = jnp.repeat(pk + pv, G, axis=2) if G > 1 else pk + pv  # [B, s, H]
    return q, k, v, pq.transpose(0, 2, 1)[..., :, None] + pkv.transpose(0, 2, 1)[..., None, :]


def poison_keys(k: Float[Array, "... s D"], v: Float[Array, "... s E"]):
    """The keys and values a PARTIAL tile's *forward* uses in a blockwise path with a hand-written
    backward (xla, the Pallas kernels): ``k`` with every row made NaN whose key or value is not
    finite, and ``v`` with non-finite entries zeroed (any layout whose last axis is the feature).

    The NaN key makes the logit of every entry of that key NaN: masking removes it from masked
    entries (``where``, exact) and keeps it in allowed ones, so their rows get NaN (visible); the
    zeroed value keeps ``p @ v`` free of ``0 * NaN`` in masked entries. A NaN query needs nothing:
    its own row is the only one it touches. The tile's *backward* takes all three inputs through
    :func:`zero_non_finite` instead (it recomputes logits and differentiates the score mod, which
    must see finite scores), and :func:`tile_backward` keeps masked entries exactly zero; the poison
    reaches the attending rows through their log-sum-exp (NaN) instead. FULL tiles have nothing
    masked and use neither: their cost does not change."""
    # keepdims: the row's poison stays a column ([bk, 1]), never a 1-D vector (Mosaic's layouts)
    poison = _poison(k, keepdims=True) + _poison(v, keepdims=True)
    return _zero_non_finite(k) + poison.astype(k.dtype), _zero_non_finite(v)


def dropout_scale(problem: Problem, q_idx: Array, kv_idx: Array, bh=None) -> Array | None:
    """``keep / (1 - rate)`` for a tile, or None without dropout."""
    if problem.dropout is None:
        return None
    return problem.dropout.scale(*index_arrays(problem, q_idx, kv_idx, bh))


def _dropped(w: Array, zs: Array | None) -> Array:
    return w if zs is None else w * zs


# ---------------------------------------------------------------------------------------------
# Tile updates shared by the blockwise paths (xla and the Pallas kernels).


def softmax_update(carry, s: Array, pv, zs: Array | None = None):
    """One online-softmax step: fold a tile of logits ``s`` (masked entries ``-inf``) into the
    running ``(max, sum, acc)``; ``pv(p)`` multiplies tile weights by the tile's values. With
    dropout (``zs = keep / (1 - rate)``) the sum counts every weight and ``acc`` the kept ones."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    # Rows that have seen no allowed key yet keep m = -inf; shift them by 0 instead so exp()
    # gives exact zeros rather than NaN (-inf - -inf).
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv(_dropped(p, zs))


def softmax_finish(m: Array, l: Array, acc: Array):
    """Output and log-sum-exp; a row with no allowed key gives zeros and ``-inf``."""
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)[..., None]
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out, lse


def merge(parts) -> tuple[Float[Array, "... E"], Float[Array, "..."]]:
    """Merges partial attentions ``[(out [..., E], lse [...]), ...]`` (float32) over disjoint
    key sets into ``(out, lse)`` of the union; a row with ``lse = -inf`` everywhere gives zeros."""
    lses = jnp.stack([lse for _, lse in parts])
    # The shift is only for range; it cancels, so no gradient needs to flow through it.
    top = jax.lax.stop_gradient(lses.max(0))
    top = jnp.where(jnp.isneginf(top), 0.0, top)
    ws = jnp.exp(lses - top)  # [n, ...]; exactly 0 for lse = -inf
    total = ws.sum(0)
    safe = jnp.where(total == 0, 1.0, total)
    out = sum(w[..., None] * o for w, (o, _) in zip(ws, parts)) / safe[..., None]
    lse = jnp.where(total == 0, -jnp.inf, top + jnp.log(safe))
    return out, lse


def masked_logits(s: Array, ok: Array | None, fill: float) -> Array:
    return s if ok is None else jnp.where(ok, s, fill)


def elementwise_weights(normalizer: Normalizer, kv_len: int, s: Array, ok: Array | None,
                        zs: Array | None = None) -> Array:
    """``f(s)`` with masked entries exactly zero (``f`` never sees a masked logit), dropped."""
    w = normalizer.weights(kv_len, masked_logits(s, ok, 0.0))
    return _dropped(w if ok is None else jnp.where(ok, w, 0.0), zs)


def tile_backward(normalizer: Normalizer, kv_len: int, s, ok, lse, delta, dp, zs=None):
    """Per-tile backward of the normalizer: returns ``(p, ds, d_normalizer)``.

    ``s`` are the tile's logits, ``ok`` its mask (None for a full tile), ``dp = dO V^T`` and
    ``zs`` the dropout scale (or None). ``p`` are the weights that multiplied the values (after
    dropout). For softmax ``lse`` and ``delta = rowsum(dO * O) - dlse`` are per row
    (``[..., t, 1]``) and ``ds = p * (dp * zs - delta)`` (dropout leaves ``delta``'s form
    unchanged since ``O`` already includes it); elementwise normalizers differentiate ``f`` with
    ``jax.vjp``.
    """
    dp = _dropped(dp, zs)
    if normalizer.row_normalized:
        # Masked entries get p = exp(-inf) = 0 exactly, also in a row whose lse is NaN (it attends
        # a non-finite input elsewhere; exp(-inf - NaN) would be NaN), and such a row's delta
        # (NaN) is replaced by 0, so masked entries have ds = 0 * finite: dk, dv of keys a row
        # cannot see stay clean. Its allowed entries keep p = NaN.
        p = jnp.exp(s - lse if ok is None else jnp.where(ok, s - lse, -jnp.inf))
        ds = p * (dp - jnp.where(jnp.isfinite(delta), delta, 0.0))
        zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), normalizer)
        return _dropped(p, zs), ds, zeros
    p, w_vjp = jax.vjp(lambda s_, n_: n_.weights(kv_len, s_), masked_logits(s, ok, 0.0), normalizer)
    if ok is not None:
        p, dp = jnp.where(ok, p, 0.0), jnp.where(ok, dp, 0.0)
    ds, d_norm = w_vjp(dp)
    return _dropped(p, zs), ds, d_norm
