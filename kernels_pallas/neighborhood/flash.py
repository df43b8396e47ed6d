"""Block-sparse flash attention for neighborhood masks: forward, dQ and dK/dV kernels.

Layout inside: ``[B, H, T, D]`` (heads before tokens, so a block is one head's tile). The
sequence is padded to a multiple of the tile; the tile plan comes from the mask's analytic block
map (:meth:`attnjax.masks.Mask.block_map`): per query tile, the non-empty key tiles in
increasing order and their count, and per tile whether it is FULL (no mask evaluation) or
PARTIAL (mask evaluated from the per-axis formula on the tile's indices). Each program loops over
its row's non-empty tiles only, so work is proportional to the number of non-empty tiles.

* forward: grid ``(B, H, nq)``; online softmax (FlashAttention-2), writes ``O`` and ``lse``.
* dQ: grid ``(B, H, nq)``, same loop, recomputes ``P = exp(S - lse)``.
* dK/dV: grid ``(B, K, nk)``; loops over the query tiles that see this key tile (the transposed
  plan) and over the ``G = H / K`` query heads sharing the key head (grouped-query attention
  without repeating K/V).

K/V (forward, dQ) and Q/dO (dK/dV) are passed whole per head and sliced with ``pl.ds`` inside the
loop: the tiles a row visits are data-dependent, so they cannot be expressed as BlockSpecs
without scalar prefetch (TPU only).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.masks import EMPTY, FULL, Mask, collapse
from kernels_pallas import backend


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int = 64
    block_k: int = 64


@dataclasses.dataclass(frozen=True)
class _Static:
    mask: Mask  # static (no array leaves): a Neighborhood mask, or algebra over static masks
    scale: float
    seq_len: int
    block_q: int
    block_k: int
    groups: int


def _round_up(n, m):
    return -(-n // m) * m


def _dot_t(a, b):
    """``a @ b.T`` in float32: ``[m, d] x [n, d] -> [m, n]``."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    """``a @ b`` in float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """``a.T @ b`` in float32: ``[m, n] x [m, d] -> [n, d]``."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mask_tile(st: _Static, q_start, kv_start, s):
    """``s`` with disallowed entries (and padded keys) set to -inf."""
    q_idx = q_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    kv_idx = kv_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    ok = st.mask.predicate(st.seq_len, st.seq_len, 0, 0, q_idx, kv_idx) & (kv_idx < st.seq_len)
    return jnp.where(ok, s, -jnp.inf)


def _plan(st: _Static, n_pad: int):
    """Tile classes, visiting order and counts per query tile, and the transposed plan."""
    classes = st.mask.block_map(st.seq_len, st.seq_len, st.block_q, st.block_k)
    classes = collapse(classes, pad_kv=n_pad > st.seq_len).astype(jnp.int32)  # [nq, nk]
    nonempty = classes != EMPTY
    order = jnp.argsort(~nonempty, axis=1, stable=True).astype(jnp.int32)
    counts = nonempty.sum(1, dtype=jnp.int32)
    order_t = jnp.argsort(~nonempty.T, axis=1, stable=True).astype(jnp.int32)
    counts_t = nonempty.sum(0, dtype=jnp.int32)
    return classes, order, counts, order_t, counts_t


# --------------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(classes_ref, order_ref, counts_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, st: _Static):
    i = pl.program_id(2)
    bq, bk = st.block_q, st.block_k
    q = q_ref[...]  # [bq, D]

    def step(masked, j, carry):
        m, l, acc = carry
        kv_start = pl.multiple_of(order_ref[i, j] * bk, bk)
        k = k_ref[pl.ds(kv_start, bk), :]  # [bk, D]
        v = v_ref[pl.ds(kv_start, bk), :]  # [bk, E]
        s = _dot_t(q, k) * st.scale  # [bq, bk]
        if masked:
            s = _mask_tile(st, i * bq, kv_start, s)
        m_new = jnp.maximum(m, s.max(-1))
        # Rows with no allowed key so far keep m = -inf: shift by 0 so exp gives 0, not NaN.
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return m_new, alpha * l + p.sum(-1), acc

    def body(j, carry):
        full = classes_ref[i, order_ref[i, j]] == FULL
        return lax.cond(full, functools.partial(step, False, j), functools.partial(step, True, j), carry)

    E = v_ref.shape[-1]
    f32 = jnp.float32
    init = (jnp.full((bq,), -jnp.inf, f32), jnp.zeros((bq,), f32), jnp.zeros((bq, E), f32))
    m, l, acc = lax.fori_loop(0, counts_ref[i], body, init)
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _forward(st: _Static, q, k, v):
    """``q [B, H, N, D]``, ``k/v [B, K, N, D/E]`` (N padded) -> ``o [B, H, N, E]``, ``lse [B, H, N]``."""
    B, H, N, D = q.shape
    E = v.shape[-1]
    bq, bk, G = st.block_q, st.block_k, st.groups
    classes, order, counts, _, _ = _plan(st, N)
    nq = N // bq
    whole = lambda x: pl.BlockSpec(x.shape, lambda b, h, i: (0,) * x.ndim)
    kv_spec = lambda dim: pl.BlockSpec((None, None, N, dim), lambda b, h, i: (b, h // G, 0, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(B, H, nq),
        in_specs=[whole(classes), whole(order), whole(counts),
                  pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0)), kv_spec(D), kv_spec(E)],
        out_specs=[pl.BlockSpec((None, None, bq, E), lambda b, h, i: (b, h, i, 0)),
                   pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct((B, H, N, E), q.dtype), jax.ShapeDtypeStruct((B, H, N), jnp.float32)],
        interpret=backend.interpret(),
        name="neighborhood_fwd",
    )(classes, order, counts, q, k, v)


# --------------------------------------------------------------------------------------------
# Backward


def _dq_kernel(classes_ref, order_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, st: _Static):
    i = pl.program_id(2)
    bq, bk = st.block_q, st.block_k
    q, do = q_ref[...], do_ref[...]  # [bq, D], [bq, E]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]  # [bq, 1]

    def step(masked, j, dq):
        kv_start = pl.multiple_of(order_ref[i, j] * bk, bk)
        k = k_ref[pl.ds(kv_start, bk), :]
        v = v_ref[pl.ds(kv_start, bk), :]
        s = _dot_t(q, k) * st.scale
        if masked:
            s = _mask_tile(st, i * bq, kv_start, s)
        p = jnp.exp(s - lse)  # [bq, bk]
        ds = p * (_dot_t(do, v) - delta)
        return dq + _dot(ds.astype(k.dtype), k)

    def body(j, dq):
        full = classes_ref[i, order_ref[i, j]] == FULL
        return lax.cond(full, functools.partial(step, False, j), functools.partial(step, True, j), dq)

    dq = lax.fori_loop(0, counts_ref[i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(classes_ref, order_t_ref, counts_t_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, st: _Static):
    kt = pl.program_id(2)
    bq, bk = st.block_q, st.block_k
    k, v = k_ref[...], v_ref[...]  # [bk, D], [bk, E]
    kv_start = kt * bk

    def step(masked, j, carry):
        dk, dv = carry
        qt = order_t_ref[kt, j]
        q_start = pl.multiple_of(qt * bq, bq)
        for g in range(st.groups):  # query heads sharing this key head
            q = q_ref[g, pl.ds(q_start, bq), :]  # [bq, D]
            do = do_ref[g, pl.ds(q_start, bq), :]  # [bq, E]
            lse = lse_ref[g, pl.ds(q_start, bq)][:, None]
            delta = delta_ref[g, pl.ds(q_start, bq)][:, None]
            s = _dot_t(q, k) * st.scale
            if masked:
                s = _mask_tile(st, q_start, kv_start, s)
            p = jnp.exp(s - lse)  # [bq, bk]
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            ds = p * (_dot_t(do, v) - delta)
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    def body(j, carry):
        full = classes_ref[order_t_ref[kt, j], kt] == FULL
        return lax.cond(full, functools.partial(step, False, j), functools.partial(step, True, j), carry)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, counts_t_ref[kt], body, init)
    dk_ref[...] = (dk * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(st: _Static, q, k, v, o, lse, do):
    B, H, N, D = q.shape
    K, E = k.shape[1], v.shape[-1]
    bq, bk, G = st.block_q, st.block_k, st.groups
    classes, order, counts, order_t, counts_t = _plan(st, N)
    # Rows with no allowed key: their P is 0 (all logits -inf), so any finite lse will do.
    lse = jnp.where(jnp.isneginf(lse), 0.0, lse)
    delta = (do.astype(jnp.float32) * o.astype(jnp.float32)).sum(-1)  # [B, H, N]
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    row = lambda dim: pl.BlockSpec((None, None, bq, dim), lambda b, h, i: (b, h, i, 0))
    vec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    kv_whole = lambda dim: pl.BlockSpec((None, None, N, dim), lambda b, h, i: (b, h // G, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(B, H, N // bq),
        in_specs=[whole(classes), whole(order), whole(counts), row(D), kv_whole(D), kv_whole(E), row(E),
                  vec, vec],
        out_specs=row(D),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=backend.interpret(),
        name="neighborhood_dq",
    )(classes, order, counts, q, k, v, do, lse, delta)

    grouped = lambda x: x.reshape(B, K, G, *x.shape[2:])  # [B, K, G, N, ...]
    q_whole = lambda dim: pl.BlockSpec((None, None, G, N, dim), lambda b, h, j: (b, h, 0, 0, 0))
    vec_whole = pl.BlockSpec((None, None, G, N), lambda b, h, j: (b, h, 0, 0))
    tile = lambda dim: pl.BlockSpec((None, None, bk, dim), lambda b, h, j: (b, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        grid=(B, K, N // bk),
        in_specs=[whole(classes), whole(order_t), whole(counts_t), q_whole(D), tile(D), tile(E), q_whole(E),
                  vec_whole, vec_whole],
        out_specs=[tile(D), tile(E)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=backend.interpret(),
        name="neighborhood_dkv",
    )(classes, order_t, counts_t, grouped(q), k, v, grouped(do), grouped(lse), grouped(delta))
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v):
    return _forward(st, q, k, v)[0]


def _flash_fwd(st, q, k, v):
    o, lse = _forward(st, q, k, v)
    return o, (q, k, v, o, lse)


def _flash_bwd(st, res, do):
    q, k, v, o, lse = res
    return _backward(st, q, k, v, o, lse, do)


_flash.defvjp(_flash_fwd, _flash_bwd)


def neighborhood_attention(q, k, v, mask: Mask, scale: float, block_sizes: BlockSizes | None = None):
    """``q [B, T, H, D]``, ``k/v [B, T, K, D/E]`` (flattened tokens) -> ``[B, T, H, E]``.

    ``mask`` must be static (no array leaves), e.g. :func:`attnjax.masks.neighborhood`.
    """
    if jax.tree.leaves(mask):
        raise NotImplementedError("the neighborhood Pallas kernel takes static masks only (no array leaves)")
    B, T, H, D = q.shape
    K = k.shape[2]
    bs = block_sizes or BlockSizes()
    # One tile size for both axes keeps the padding identical for queries and keys.
    block = min(bs.block_q, bs.block_k, _round_up(T, 8))
    N = _round_up(T, block)
    st = _Static(mask, float(scale), T, block, block, H // K)
    to_heads = lambda x: jnp.pad(x, ((0, 0), (0, N - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    out = _flash(st, to_heads(q), to_heads(k), to_heads(v))  # [B, H, N, E]
    return out.transpose(0, 2, 1, 3)[:, :T]
