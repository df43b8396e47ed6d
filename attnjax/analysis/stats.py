"""Per-row and per-key statistics of attention weights, dense or blockwise.

Letter legend: B batch, H heads, T queries, S keys. Weights are ``A[b, h, t, s]``; the query
``t`` sits at position ``pos_t = t + q_offset`` (default ``S - T``: bottom-right, as when
decoding with a cache; ``0`` for self-attention), key ``s`` at position ``s``.

=============  ============  ====================================================================
key            shape         value
=============  ============  ====================================================================
entropy        [B, H, T]     ``-sum_s A log A`` (nats)
row_mass       [B, H, T]     ``sum_s A`` (1 for a softmax row with an allowed key, 0 without)
first_mass     [B, H, T]     ``sum_{s < first_k} A``: mass on the first tokens (sinks)
top_mass       [B, H, T]     sum of the ``top_k`` largest weights of the row (concentration)
max_weight     [B, H, T]     ``max_s A``
argmax         [B, H, T]     ``argmax_s A`` (first on ties), int32
offsets        [B, H, T, O]  ``A[t, pos_t - o]`` for ``o = 0 .. num_offsets - 1`` (0 off range);
                             ``o = 1`` is the previous token
waad           [B, H, T]     ``sum_s A min(|pos_t - s|, window)`` (windowed attention distance)
received       [B, H, S]     ``sum_t A``: mass each key receives
fai            [B, H, S]     ``sum_{t: pos_t > s} A / #{t: pos_t > s}``: mean attention a key
                             receives from later tokens (0 where none is later)
=============  ============  ====================================================================

:func:`weight_stats` computes them from a dense ``[B, H, T, S]`` array; :func:`blockwise_stats`
from ``q`` and ``k`` one key tile at a time, never holding more than ``[B, H, T, block_k]``
weights, with the row normalizer of :func:`attnjax.ops.attention` (its log-sum-exp), and gives
the same numbers.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attnjax import ops
from attnjax.normalizers import as_normalizer

ROW_KEYS = ("entropy", "row_mass", "first_mass", "top_mass", "max_weight", "argmax", "waad")
KEY_KEYS = ("received", "fai")


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    """What the statistics look at (see the module docstring)."""

    first_k: int = 4
    top_k: int = 4
    num_offsets: int = 8
    window: int = 8
    q_offset: int | None = None
    block_k: int = 128

    def __post_init__(self):
        for name in ("first_k", "top_k", "num_offsets", "window", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"StatsConfig.{name} must be a positive int; got {v!r}")


def _positions(T: int, S: int, cfg: StatsConfig):
    off = S - T if cfg.q_offset is None else cfg.q_offset
    return jnp.arange(T, dtype=jnp.int32) + off


def _entropy_terms(w):
    return -jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0)


def _tile_terms(w, q_pos, kv_idx, S, cfg):
    """Row sums and key sums of one tile of weights ``w [B, H, T, s]`` at key indices ``kv_idx``."""
    dist = q_pos[:, None] - kv_idx[None, :]  # [T, s]
    valid = (kv_idx < S)[None, :]
    w = jnp.where(valid, w, 0.0)
    offs = jnp.arange(cfg.num_offsets, dtype=jnp.int32)
    at_offset = (dist[..., None] == offs).astype(w.dtype)  # [T, s, O]
    later = (dist > 0) & valid
    return dict(
        entropy=_entropy_terms(w).sum(-1),
        row_mass=w.sum(-1),
        first_mass=jnp.where(kv_idx[None, :] < cfg.first_k, w, 0.0).sum(-1),
        waad=(w * jnp.minimum(jnp.abs(dist), cfg.window)).sum(-1),
        offsets=jnp.einsum("bhts,tso->bhto", w, at_offset),
        received=w.sum(-2),
        later=jnp.where(later, w, 0.0).sum(-2),
    )


def weight_stats(weights: Float[Array, "B H T S"], config: StatsConfig | None = None, **kwargs) -> dict:
    """The statistics of dense weights ``[B, H, T, S]`` (see the module docstring); ``config``
    or its fields as keywords.

    >>> import jax.numpy as jnp
    >>> w = jnp.eye(3)[None, None]  # each token attends to itself
    >>> st = weight_stats(w, q_offset=0)
    >>> offsets, entropy = st["offsets"], st["entropy"]
    >>> offsets[0, 0, :, 0].tolist(), entropy.max().item()
    ([1.0, 1.0, 1.0], 0.0)
    """
    cfg = config or StatsConfig(**kwargs)
    w = jnp.asarray(weights, jnp.float32)
    if w.ndim != 4:
        raise ValueError(f"weights must have shape [B, H, T, S]; got {tuple(w.shape)}")
    T, S = w.shape[-2:]
    q_pos = _positions(T, S, cfg)
    kv_idx = jnp.arange(S, dtype=jnp.int32)
    out = _tile_terms(w, q_pos, kv_idx, S, cfg)
    k = min(cfg.top_k, S)
    out["top_mass"] = lax.top_k(w, k)[0].sum(-1)
    out["max_weight"] = w.max(-1)
    out["argmax"] = jnp.argmax(w, -1).astype(jnp.int32)
    out["fai"] = _fai(out.pop("later"), q_pos, kv_idx)
    return out


def _fai(later_sum, q_pos, kv_idx):
    count = (q_pos[:, None] > kv_idx[None, :]).sum(0)  # [S]
    return later_sum / jnp.maximum(count, 1).astype(jnp.float32)


def blockwise_stats(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    *,
    op=ops.attention,
    config: StatsConfig | None = None,
    **op_kwargs,
) -> dict:
    """The statistics of ``op(q, k, v, **op_kwargs)``'s weights, one key tile at a time.

    ``op`` is :func:`attnjax.ops.attention` or :func:`attnjax.ops.sigmoid_attention` (any op
    taking ``shard=`` and, for row-normalized normalizers, ``return_lse=``), with its masks,
    score mods, biases (``bias=`` as a keyword) and normalizer in ``op_kwargs``. Memory is
    ``O(B H T block_k)``: a first call gives each row's log-sum-exp, then each key tile's weights
    come from the op itself on that tile (a :class:`attnjax.ops.Shard` keeps masks and score mods
    at global positions) with one-hot values, ``exp(lse_tile - lse)`` times the tile's own
    softmax, and are folded into running sums, a running top-k and a running argmax.

    >>> import jax
    >>> from attnjax import masks
    >>> q = k = jax.random.normal(jax.random.key(0), (1, 40, 2, 8))
    >>> st = blockwise_stats(q, k, mask=masks.causal(), config=StatsConfig(block_k=16))
    >>> st["received"].shape, round(float(st["row_mass"].mean()), 5)
    ((1, 2, 40), 1.0)
    """
    cfg = config or StatsConfig()
    for name, x in (("q", q), ("k", k)):
        if getattr(x, "ndim", 0) != 4:
            raise ValueError(f"{name} must have shape [B, T|S, H|K, D]; got {getattr(x, 'shape', x)}")
    if "shard" in op_kwargs:
        raise ValueError("blockwise_stats tiles the keys itself; do not pass shard=")
    params = set(inspect.signature(op).parameters)
    if "shard" not in params:
        raise ValueError(
            f"blockwise_stats needs an op taking shard= (ops.attention); got {getattr(op, '__name__', op)}"
        )
    B, T, H, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    normalizer = as_normalizer(op_kwargs.get("normalizer", "softmax"), op_kwargs.get("sigmoid_bias"))
    row_normalized = normalizer.row_normalized and "return_lse" in params and op is not ops.sigmoid_attention
    bk = min(cfg.block_k, S)
    nk = -(-S // bk)
    pad = nk * bk - S
    kp = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    bias = bias_full = op_kwargs.pop("bias", None)
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.ndim != 4:
            raise ValueError(f"bias must be rank 4 [#B, #H, #T, #S]; got {tuple(bias.shape)}")
        if bias.shape[-1] == S:
            bias = jnp.pad(bias, ((0, 0),) * 3 + ((0, pad),))
    if row_normalized:
        _, lse = op(q, k, jnp.zeros((*k.shape[:3], 1), q.dtype), bias=bias_full, return_lse=True, **op_kwargs)
        lse = lse.transpose(0, 2, 1)[..., None]  # [B, H, T, 1]
    onehot = jnp.broadcast_to(jnp.eye(bk, dtype=q.dtype)[None, :, None, :], (B, bk, K, bk))
    q_pos = _positions(T, S, cfg)
    topk = min(cfg.top_k, S)

    def tile(j):
        j0 = j * bk
        kt = lax.dynamic_slice_in_dim(kp, j0, bk, axis=1)
        shard = ops.Shard.make(batch=B, heads=H, q_len=T, kv_len=S, kv_offset=j0)
        kw = dict(op_kwargs, shard=shard)
        if bias is not None:
            kw["bias"] = lax.dynamic_slice_in_dim(bias, j0, bk, axis=3) if bias.shape[-1] > 1 else bias
        if row_normalized:
            out, lse_t = op(q, kt, onehot, return_lse=True, **kw)
            lse_t = lse_t.transpose(0, 2, 1)[..., None]
            scale = jnp.where(jnp.isfinite(lse_t) & jnp.isfinite(lse), jnp.exp(lse_t - lse), 0.0)
            w = out.astype(jnp.float32).transpose(0, 2, 1, 3) * scale
        else:
            w = op(q, kt, onehot, **kw).astype(jnp.float32).transpose(0, 2, 1, 3)
        return w, j0 + jnp.arange(bk, dtype=jnp.int32)

    def step(carry, j):
        w, kv_idx = tile(j)
        w = jnp.where((kv_idx < S)[None, None, None, :], w, 0.0)
        terms = _tile_terms(w, q_pos, kv_idx, S, cfg)
        sums, keys, top, mx, arg = carry
        sums = {n: sums[n] + terms[n] for n in sums}
        keys = {n: lax.dynamic_update_slice_in_dim(keys[n], terms[n], j * bk, axis=2) for n in keys}
        top = lax.top_k(jnp.concatenate([top, w], -1), topk)[0]
        tmax = w.max(-1)
        targ = jnp.argmax(w, -1).astype(jnp.int32) + j * bk
        better = tmax > mx
        return (sums, keys, top, jnp.where(better, tmax, mx), jnp.where(better, targ, arg)), None

    rows = dict(entropy=(), row_mass=(), first_mass=(), waad=(), offsets=(cfg.num_offsets,))
    init = (
        {n: jnp.zeros((B, H, T, *extra), jnp.float32) for n, extra in rows.items()},
        {n: jnp.zeros((B, H, nk * bk), jnp.float32) for n in ("received", "later")},
        jnp.full((B, H, T, topk), -jnp.inf, jnp.float32),
        jnp.full((B, H, T), -jnp.inf, jnp.float32),
        jnp.zeros((B, H, T), jnp.int32),
    )
    (sums, keys, top, mx, arg), _ = lax.scan(step, init, jnp.arange(nk))
    out = dict(sums)
    out["top_mass"] = jnp.where(jnp.isfinite(top), top, 0.0).sum(-1)
    out["max_weight"], out["argmax"] = mx, arg
    out["received"] = keys["received"][..., :S]
    out["fai"] = _fai(keys["later"][..., :S], q_pos, jnp.arange(S, dtype=jnp.int32))
    return out


def reduce_stats(stats: dict, axis=(0, 2)) -> dict:
    """Row statistics averaged over batch and queries (``[H]`` per head) and key statistics over
    batch and keys: a per-head summary. ``argmax`` is dropped."""
    out = {}
    for n, x in stats.items():
        if n == "argmax":
            continue
        out[n] = jnp.mean(x, axis=axis)
    return out
