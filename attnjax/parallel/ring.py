r"""Ring attention: softmax and sigmoid attention with the sequence sharded over a mesh axis.

Each of the ``P`` devices on ``axis_name`` holds a block of the queries and of the keys/values.
In ``P`` steps every device attends its queries to the key/value block it holds, then passes
that block to its neighbour with ``ppermute`` ("Ring Attention with Blockwise Transformers",
Liu et al., 2023). Partial results merge exactly:

* softmax, by log-sum-exp: with block outputs :math:`O_j` and row log-sum-exps :math:`\ell_j`,
  :math:`\ell = \log\sum_j e^{\ell_j}` and :math:`O = \sum_j e^{\ell_j - \ell} O_j`;
* sigmoid (and other elementwise normalizers): weights do not depend on other keys, so
  :math:`O = \sum_j O_j` ("Theory, Analysis, and Best Practices for Sigmoid Self-Attention").

Every block call is :func:`attnjax.ops.attention` with a :class:`attnjax.ops.Shard` giving the
global positions of its queries and keys, so masks (causal, windows, documents), score mods
(ALiBi, ...) and dropout act exactly as on the unsharded sequence, and each block call skips its
own empty tiles. Mask and score-mod arrays (segment ids, slopes) are global and replicated: a
few bytes per token, never the ``O(S D)`` keys and values.

**Load balance.** Under a causal mask, contiguous blocks leave device 0 idle for most steps.
``layout="zigzag"`` gives device ``i`` the chunks ``i`` and ``2P - 1 - i`` of ``2P`` equal chunks,
so every device has the same causal work; reorder the global sequence with :func:`zigzag` (and
back with :func:`unzigzag`) before sharding it. Positions (masks, score mods) stay those of the
natural order.

**Cost** per device: ``P`` block attentions of ``(T/P) x (S/P)``, and ``P - 1`` transfers of a
K/V block (``2 (S/P) K D`` elements each) overlapping the compute. The backward pass is a custom
VJP that passes K/V around the ring once more, together with their gradient accumulators (which
arrive home after ``P`` steps), recomputing each block: memory stays ``O((T + S)/P)`` per device.

Use inside ``jax.shard_map(..., check_vma=False)`` (Pallas kernels need it); gradients of
replicated score-mod or normalizer parameters are summed over devices by ``shard_map``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import _checks
from attnjax.dropout import Dropout, check_rate
from attnjax.masks import Mask
from attnjax.normalizers import as_normalizer
from attnjax.core import tiling
from attnjax.ops import attention
from attnjax.core import Shard
from attnjax.core.blocks import BlockSizes
from attnjax.score_mods import as_score_mod

LAYOUTS = ("contiguous", "zigzag")


def zigzag(x, num_shards: int, axis: int = 1):
    """Reorders a sequence axis so that ``num_shards`` contiguous shards hold the zig-zag chunks:
    shard ``i`` gets chunks ``i`` and ``2 * num_shards - 1 - i`` of ``2 * num_shards``.

    >>> import jax.numpy as jnp
    >>> zigzag(jnp.arange(8)[None], 2)
    Array([[0, 1, 6, 7, 2, 3, 4, 5]], dtype=int32)
    """
    return jnp.take(x, _zigzag_order(x.shape[axis], num_shards), axis=axis)


def unzigzag(x, num_shards: int, axis: int = 1):
    """The inverse of :func:`zigzag`."""
    order = _zigzag_order(x.shape[axis], num_shards)
    return jnp.take(x, jnp.argsort(order), axis=axis)


def _zigzag_order(n: int, num_shards: int):
    num_shards = _checks.positive_int("num_shards", num_shards)
    if n % (2 * num_shards):
        raise ValueError(f"zigzag needs a sequence length divisible by 2 * num_shards = {2 * num_shards}; got {n}")
    c = n // (2 * num_shards)
    chunks = [j for i in range(num_shards) for j in (i, 2 * num_shards - 1 - i)]
    return jnp.concatenate([jnp.arange(j * c, (j + 1) * c) for j in chunks])


@dataclasses.dataclass(frozen=True)
class _Config:
    axis_name: str
    size: int  # devices on the axis
    layout: str
    batch: int  # global sizes
    heads: int
    q_len: int
    kv_len: int
    scale: float | None
    dropout_rate: float
    implementation: str | tuple[str, ...] | None
    block_sizes: BlockSizes | None

    def pieces(self, device, length: int):
        """``(local start, size, global start)`` of the contiguous pieces ``device`` holds."""
        if self.layout == "contiguous":
            return [(0, length, device * length)]
        c = length // 2
        return [(0, c, device * c), (c, c, (2 * self.size - 1 - device) * c)]


def ring_attention(
    q, k, v, *, axis_name: str, layout: str = "contiguous", mask: Mask | None = None, score_mod=None,
    normalizer="softmax", sigmoid_bias=None, scale: float | None = None, dropout_rate: float = 0.0,
    dropout_key=None, return_lse: bool = False, implementation=None, block_sizes: BlockSizes | None = None,
    batch_shard: tuple | None = None, head_shard: tuple | None = None,
):
    """Attention over a sequence sharded along mesh axis ``axis_name`` (call inside ``shard_map``).

    Args:
      q, k, v: this device's blocks ``[B, T/P, H, D]``, ``[B, S/P, K, D]``, ``[B, S/P, K, E]``
        of global sequences of length ``T`` and ``S``, in ``layout`` order.
      axis_name: the mesh axis the sequence is sharded over (``P`` devices).
      layout: ``"contiguous"`` (device ``i`` holds positions ``[i T/P, (i + 1) T/P)``) or
        ``"zigzag"`` (see :func:`zigzag`; balances causal masks).
      mask, score_mod, normalizer, sigmoid_bias, scale: as in :func:`attnjax.ops.attention`,
        over the *global* problem (``-log S`` is the global ``S``; mask arrays are global).
      dropout_rate, dropout_key, implementation, block_sizes: as in :func:`attnjax.ops.attention`.
      return_lse: also return the rows' global log-sum-exp ``[B, T/P, H]`` (softmax only).
      batch_shard, head_shard: ``(global size, offset)`` when batch elements or heads are also
        sharded (set by :func:`attnjax.parallel.shard_op`), so masks, score mods and dropout see
        global batch and head indices; default: not sharded.

    Returns:
      ``[B, T/P, H, E]`` (and the log-sum-exp), this device's rows of the global attention.
    """
    B, t, s, H, K, D, E = _checks.check_qkv(q, k, v)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if layout == "zigzag" and (t % 2 or s % 2):
        raise ValueError(f"layout='zigzag' needs even local lengths (two chunks per device); got q {t}, kv {s}")
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"mask must be an attnjax.masks mask or None; got {type(mask).__name__}")
    P = lax.axis_size(axis_name)
    (gb, b0), (gh, h0) = batch_shard or (B, 0), head_shard or (H, 0)
    norm = as_normalizer(normalizer, sigmoid_bias)
    if return_lse and not norm.row_normalized:
        raise ValueError("return_lse needs a row-normalized normalizer (softmax)")
    dropout = None
    if check_rate(dropout_rate) != 0.0 or dropout_key is not None:
        dropout = Dropout.make(dropout_rate, dropout_key)
    impl = tuple(implementation) if isinstance(implementation, (list, tuple)) else implementation
    cfg = _Config(axis_name, P, layout, gb, gh, t * P, s * P, scale, float(dropout_rate), impl, block_sizes)
    offsets = (jnp.asarray(b0, jnp.int32), jnp.asarray(h0, jnp.int32))
    out, lse = _ring(cfg, q, k, v, as_score_mod(score_mod), norm, mask, dropout, offsets)
    return (out, lse) if return_lse else out


def _block(cfg: _Config, q, k, v, score_mod, normalizer, mask, dropout, offsets, device, source):
    """This device's queries against the K/V block of ``source``: float32 ``(out, lse)``."""
    softmax = normalizer.row_normalized
    rows = []
    for qs, ql, qg in cfg.pieces(device, q.shape[1]):
        acc = None
        for ks, kl, kg in cfg.pieces(source, k.shape[1]):
            shard = Shard.make(batch=cfg.batch, heads=cfg.heads, q_len=cfg.q_len, kv_len=cfg.kv_len,
                               batch_offset=offsets[0], head_offset=offsets[1], q_offset=qg, kv_offset=kg)
            res = attention(
                q[:, qs:qs + ql], k[:, ks:ks + kl], v[:, ks:ks + kl], mask=mask, score_mod=score_mod,
                normalizer=normalizer, scale=cfg.scale, return_lse=softmax, shard=shard,
                dropout_rate=cfg.dropout_rate, dropout_key=None if dropout is None else dropout.seed,
                implementation=cfg.implementation, block_sizes=cfg.block_sizes,
            )
            o, l = res if softmax else (res, jnp.zeros(res.shape[:-1], jnp.float32))
            part = (o.astype(jnp.float32), l)
            acc = part if acc is None else merge(acc, part, softmax)
        rows.append(acc)
    return tuple(jnp.concatenate(x, axis=1) for x in zip(*rows))


def merge(a, b, softmax: bool = True):
    """Merges two partial attentions ``(out f32 [..., E], lse [...])`` over disjoint key sets:
    by log-sum-exp for softmax (:func:`attnjax.ops.tiling.merge`), by sum otherwise."""
    return tiling.merge([a, b]) if softmax else (a[0] + b[0], a[1])


def _shift(tree, axis_name, size):
    return lax.ppermute(tree, axis_name, [(i, (i + 1) % size) for i in range(size)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg, q, k, v, score_mod, normalizer, mask, dropout, offsets):
    out, lse = _forward(cfg, q, k, v, score_mod, normalizer, mask, dropout, offsets)
    return out.astype(q.dtype), lse


def _forward(cfg: _Config, q, k, v, score_mod, normalizer, mask, dropout, offsets):
    me = lax.axis_index(cfg.axis_name)
    softmax = normalizer.row_normalized

    def block(kb, vb, step):
        source = (me - step) % cfg.size  # whose K/V this device holds at this step
        return _block(cfg, q, kb, vb, score_mod, normalizer, mask, dropout, offsets, me, source)

    def step(carry, i):
        kb, vb, acc = carry
        kb, vb = _shift((kb, vb), cfg.axis_name, cfg.size)
        return (kb, vb, merge(acc, block(kb, vb, i), softmax)), None

    (_, _, (out, lse)), _ = lax.scan(step, (k, v, block(k, v, 0)), jnp.arange(1, cfg.size))
    return out, lse


def _ring_fwd(cfg, q, k, v, score_mod, normalizer, mask, dropout, offsets):
    out, lse = _forward(cfg, q, k, v, score_mod, normalizer, mask, dropout, offsets)
    res = (q, k, v, score_mod, normalizer, mask, dropout, offsets, out, lse)
    return (out.astype(q.dtype), lse), res


def _ring_bwd(cfg, res, cotangents):
    q, k, v, score_mod, normalizer, mask, dropout, offsets, out, lse = res
    d_out, d_lse = (x.astype(jnp.float32) for x in cotangents)
    me = lax.axis_index(cfg.axis_name)
    softmax = normalizer.row_normalized
    lse_safe = jnp.where(jnp.isneginf(lse), 0.0, lse)

    def grads(kb, vb, step):
        source = (me - step) % cfg.size
        f = lambda q_, k_, v_, m_, n_: _block(cfg, q_, k_, v_, m_, n_, mask, dropout, offsets, me, source)
        (o, l), vjp = jax.vjp(f, q, kb, vb, score_mod, normalizer)
        if softmax:
            # out = sum_j w_j o_j with w_j = exp(l_j - lse): d o_j = w_j dO and
            # d l_j = w_j (<dO, o_j - out> + d lse).
            w = jnp.where(jnp.isneginf(l), 0.0, jnp.exp(l - lse_safe))
            d_o, d_l = w[..., None] * d_out, w * ((d_out * (o - out)).sum(-1) + d_lse)
        else:
            d_o, d_l = d_out, jnp.zeros_like(l)
        return vjp((d_o, d_l))

    def step(carry, i):
        kb, vb, dkb, dvb, dq, dmod, dnorm = carry
        dq_i, dk_i, dv_i, dmod_i, dnorm_i = grads(kb, vb, i)
        add = lambda a, b: jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)  # in a's dtype
        # Gradients travel with their block; after ``size`` shifts they are back at its owner.
        kb, vb, dkb, dvb = _shift((kb, vb, add(dkb, dk_i), add(dvb, dv_i)), cfg.axis_name, cfg.size)
        return (kb, vb, dkb, dvb, add(dq, dq_i), add(dmod, dmod_i), add(dnorm, dnorm_i)), None

    # Gradients accumulate in float32 whatever the input dtype, and are cast once at the end.
    zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), tree)
    init = (k, v, zeros(k), zeros(v), zeros(q), zeros(score_mod), zeros(normalizer))
    (_, _, dk, dv, dq, dmod, dnorm), _ = lax.scan(step, init, jnp.arange(cfg.size))
    cast = lambda g, x: jax.tree.map(lambda a, b: a.astype(jnp.result_type(b)), g, x)
    none = lambda tree: jax.tree.map(lambda _: None, tree)
    return (cast(dq, q), cast(dk, k), cast(dv, v), cast(dmod, score_mod), cast(dnorm, normalizer),
            none(mask), none(dropout), none(offsets))


_ring.defvjp(_ring_fwd, _ring_bwd)
