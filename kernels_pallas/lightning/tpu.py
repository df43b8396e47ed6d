r"""Lightning attention for TPU (Mosaic): the equations of :mod:`kernels_pallas.lightning.kernel`,
laid out for the TPU's pipeline instead of a GPU's loop.

* Grid ``(B, H, n)``: the chunk axis is the last, sequential grid dimension (``"arbitrary"``), so
  Mosaic's pipeline fetches chunk ``i + 1``'s ``Q, K, V`` tiles (``(C, D)`` blocks of a
  heads-major ``[B, H, Tp, D]`` copy) while chunk ``i`` computes; the ``[D, E]`` f32 state lives
  in VMEM scratch across the chunk axis and is never written to HBM except as the final state.
* Chunks of ``C = 128`` tokens (a multiple of 128: the lane and MXU width; ``block_size`` must
  be one, the default is ``core.blocks.DEFAULTS[("lightning", "tpu")]``).
* Every vector is 2-D: per-token quantities are ``[C, 1]`` columns or ``[1, C]`` rows, built
  from 2-D iotas; the log decay of the program's head and the document ids at chunk edges
  (first, last, previous chunk's last, next chunk's first) are scalars in SMEM. The GPU kernel's
  1-D ``[C]`` vectors, ``[1]`` slices and ``(1, 1)`` decay block made libtpu abort in a layout
  pass (``Check failed: arr.size() >= layout_rank(implicit_dim)``); scalars that need ``exp``
  (the chunk's total decay) are broadcast rows ``[1, E]``, never ``(1, 1)`` vectors.
* Document ids travel lane-dense as f32 ``[B, 1, Tp]`` (``(1, C)`` blocks) and become a column
  through a lane-wide transpose, as the flash kernels' log-sum-exp does.

Forward: ``O_i = (Q_i K_i^T * M_i) V_i + (Q_i * qw_i) S_{i-1}``, ``S_i = keep_i S_{i-1} +
(K_i * w_i)^T V_i``. Backward (two calls, states recomputed, never stored): ``dq`` walks the
chunks forward recomputing ``S``; ``dk, dv`` walk them backward (index maps reverse the chunk
order) carrying ``G = dL/dS`` from ``dS_T``, and write ``dS_0``. ``d log_decay`` is the GPU
kernel's identity, computed outside the calls.

Non-finite inputs and ``log_decay = -inf`` as in the GPU kernel (docs/lightning.md): decays are
``lambda^m`` of integer steps (``log_power``); the forward cleans each chunk's ``q, k, v`` and
puts their poison into the exponent of the chunk's mask, and carries the state's poison in a
``(1, 1)`` VMEM scratch beside the finite state; the backward kernels clean their inputs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnjax.core import tiling
from attnjax.core.blocks import BlockSizes
from attnjax.core.utils import log_power, round_up

from .. import backend
from ..flash.tpu import LANES
from .kernel import decay_mask

F32 = jnp.float32
EDGES = 4  # per chunk in the SMEM table: first doc, last doc, previous chunk's last, next chunk's first
SMEM_TABLE_LIMIT = 256 * 1024  # bytes of that table (SMEM is 1 MiB on v5e)


@dataclasses.dataclass(frozen=True)
class _Static:
    length: int  # real tokens T
    block: int  # chunk C
    chunks: int  # n
    scale: float
    interpret: object


def _dot(x, y, dims, dtype):
    """A product with f32 accumulation; operands cast to ``dtype`` (the input dtype for chunk-local
    products, f32 at full precision for products with the state)."""
    prec = lax.Precision.HIGHEST if dtype == F32 else None
    return lax.dot_general(x.astype(dtype), y.astype(dtype), (dims, ((), ())), precision=prec,
                           preferred_element_type=F32)


NN, NT, TN = ((1,), (0,)), ((1,), (1,)), ((0,), (0,))


def _row_to_col(x):
    """``[1, n] -> [n, 1]`` through a lane-wide transpose."""
    return jnp.broadcast_to(x, (LANES, x.shape[1])).T[:, :1]


def _col_to_row(x):
    """``[n, 1] -> [1, n]`` through a lane-wide transpose."""
    return jnp.broadcast_to(x, (x.shape[0], LANES)).T[:1, :]


def _sum(x):
    """The sum of a ``[n, 1]`` column as a ``(1, 1)`` array (no 0-d vector)."""
    return jnp.sum(x, axis=0, keepdims=True)


class _Chunk:
    """Decays and the document mask of chunk ``i`` (exponents ``<= 0``), all 2-D. Decays are
    powers ``lambda^m`` of integer step counts ``m`` (``log_power``, as the GPU kernel: exact for
    ``lambda = 0``, where a difference of log decays would be ``-inf + inf``)."""

    def __init__(self, static: _Static, a, docs_row, edges_ref, b, i, width):
        C = static.block
        at = (b * static.chunks + i) * EDGES
        self.first, self.last = edges_ref[at], edges_ref[at + 1]
        self.prev, self.next = edges_ref[at + 2], edges_ref[at + 3]
        real = jnp.clip(static.length - i * C, 0, C)  # int32 scalar: real tokens in the chunk
        jr = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
        jc = lax.broadcasted_iota(jnp.int32, (1, C), 1)
        steps_col = jnp.minimum(jr + 1, real)  # [C, 1] decay steps from the chunk start
        steps_row = jnp.minimum(jc + 1, real)  # [1, C] (padding adds none)
        self.A_col = log_power(a, steps_col)  # [C, 1] log decay from the chunk start
        self.A_rest = log_power(a, real - steps_col)  # [C, 1]: A_last - A
        self.A_last = log_power(a, jnp.full((1, width), real, jnp.int32))  # [1, width]
        self.doc_row = docs_row  # [1, C]
        self.doc_col = _row_to_col(docs_row)  # [C, 1]
        self._ok = (jr >= jc) & (self.doc_col == self.doc_row)  # [C, C]
        self._decay = log_power(a, steps_col - steps_row)  # [C, C], used where _ok only

    def mask(self, poison=None):
        """``M [C, C]`` (:func:`decay_mask`), ``poison`` broadcasting to ``[C, C]``."""
        return decay_mask(self._ok, self._decay, poison)

    def weights(self, doc, exponent):
        """``exp(exponent)`` on rows whose document is ``doc``, else 0: a ``[C, 1]`` column."""
        return decay_mask(self.doc_col == doc, exponent)

    def keep(self, doc_a, doc_b):
        """``exp(A_last)`` if ``doc_a == doc_b`` else 0, as a ``[1, width]`` row."""
        same = jnp.full(self.A_last.shape, doc_a, F32) == doc_b
        return jnp.where(same, jnp.exp(self.A_last), 0.0)


# ---------------------------------------------------------------------------------------------
# Kernels


def _fwd_kernel(a_ref, edges_ref, docs_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, sT_ref, S_ref, P_ref, *,
                static):
    # Non-finite inputs reach only the tokens that attend them, as in the GPU kernel: q, k, v
    # enter the products zeroed, and their poison (NaN or 0) enters the exponents of the decays,
    # where the mask's -inf removes it: the chunk's mask gets each row's query poison and each
    # column's key/value poison; the state stays finite (S_ref) and carries its poison beside it
    # (P_ref, (1, 1)), which crosses a document boundary by where and enters the decays of the
    # rows that read the state.
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lo = q_ref.dtype

    @pl.when(i == 0)
    def _init():
        s0, p0 = tiling.finite_or_zero(s0_ref[...], keepdims=True)  # [D, E], [D, 1]
        S_ref[...] = s0
        P_ref[...] = _sum(p0)

    E = S_ref.shape[1]
    c = _Chunk(static, a_ref[h], docs_ref[...], edges_ref, b, i, E)
    (q, pq), (k, pk), (v, pv) = (tiling.finite_or_zero(r[...], keepdims=True) for r in (q_ref, k_ref, v_ref))
    pkv = pk + pv  # [C, 1]
    S, poison = S_ref[...], P_ref[...]  # [D, E] finite, (1, 1) its poison
    p = _dot(q, k, NT, lo) * c.mask(pq + _col_to_row(pkv))  # [C, C]
    qw = c.weights(c.prev, c.A_col + poison)  # [C, 1]: the state reaches these rows
    o = _dot(p, v, NN, lo) + _dot(q.astype(F32) * qw, S, NN, F32)  # [C, E]
    o_ref[...] = static.scale * o
    in_last = c.doc_col == c.last  # [C, 1]: the keys the state after the chunk holds
    w = decay_mask(in_last, c.A_rest)  # [C, 1]
    S_ref[...] = c.keep(c.last, c.prev) * S + _dot(k.astype(F32) * w, v.astype(F32), TN, F32)
    cont = jnp.full(poison.shape, c.last, F32) == c.prev  # (1, 1)
    P_ref[...] = jnp.where(cont, poison, 0.0) + _sum(jnp.where(in_last, pkv, 0.0))

    @pl.when(i == static.chunks - 1)
    def _finish():
        sT_ref[...] = S_ref[...] + P_ref[...]


def _dq_kernel(a_ref, edges_ref, docs_ref, k_ref, v_ref, do_ref, s0_ref, dq_ref, S_ref, *, static):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lo = k_ref.dtype

    @pl.when(i == 0)
    def _init():
        (S_ref[...],) = tiling.zero_non_finite(s0_ref[...])

    E = S_ref.shape[1]
    c = _Chunk(static, a_ref[h], docs_ref[...], edges_ref, b, i, E)
    # Inputs enter zeroed where non-finite (the forward's poison is not recomputed): the masks are
    # exact zeros, so masked entries contribute exactly nothing (no 0 * NaN), as in the GPU kernel.
    k, v = tiling.zero_non_finite(k_ref[...], v_ref[...])
    do = static.scale * do_ref[...]  # f32 [C, E]: the scale folded into dO
    S = S_ref[...]
    qw = c.weights(c.prev, c.A_col)
    dq = _dot(_dot(do, v, NT, lo) * c.mask(), k, NN, lo) + _dot(do * qw, S, NT, F32)  # [C, D]
    dq_ref[...] = dq
    w = c.weights(c.last, c.A_rest)
    S_ref[...] = c.keep(c.last, c.prev) * S + _dot(k.astype(F32) * w, v.astype(F32), TN, F32)


def _dkv_kernel(a_ref, edges_ref, docs_ref, q_ref, k_ref, v_ref, do_ref, dsT_ref, dk_ref, dv_ref, ds0_ref,
                G_ref, *, static):
    b, h, r = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    i = static.chunks - 1 - r  # last chunk first
    lo = q_ref.dtype

    @pl.when(r == 0)
    def _init():
        G_ref[...] = dsT_ref[...]

    E = G_ref.shape[1]
    c = _Chunk(static, a_ref[h], docs_ref[...], edges_ref, b, i, E)
    q, k, v = tiling.zero_non_finite(q_ref[...], k_ref[...], v_ref[...])  # as in _dq_kernel
    do = static.scale * do_ref[...]  # f32 [C, E]
    G = G_ref[...]  # [D, E]: d loss / d state after this chunk
    w = c.weights(c.next, c.A_rest)  # [C, 1]: G reaches these keys
    M = c.mask()  # [C, C]
    p = _dot(q, k, NT, lo) * M  # [C, C]
    dp = _dot(do, v, NT, lo) * M  # [C, C]
    dv_ref[...] = _dot(p.T, do, NN, lo) + _dot(k.astype(F32) * w, G, NN, F32)  # [C, E]
    dk_ref[...] = _dot(dp.T, q, NN, lo) + _dot(v.astype(F32) * w, G, NT, F32)  # [C, D]
    qw = c.weights(c.first, c.A_col)
    G_ref[...] = c.keep(c.first, c.next) * G + _dot(q.astype(F32) * qw, do, TN, F32)

    @pl.when(r == static.chunks - 1)
    def _finish():
        ds0_ref[...] = G_ref[...]


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers (arrays heads-major [B, H, Tp, *])


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _specs(static, reverse=False):
    """Index maps of a chunk tile, a per-(b, h) state, the docs row, and SMEM operands."""
    n = static.chunks
    chunk = (lambda i: n - 1 - i) if reverse else (lambda i: i)
    C = static.block
    tile = lambda width: pl.BlockSpec((None, None, C, width), lambda b, h, i: (b, h, chunk(i), 0))
    state = lambda D, E: pl.BlockSpec((None, None, D, E), lambda b, h, i: (b, h, 0, 0))
    docs = pl.BlockSpec((None, 1, C), lambda b, h, i: (b, 0, chunk(i)))
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    return tile, state, docs, smem


def _forward(static, q, k, v, a, edges, docs, s0):
    B, H, Tp, D = q.shape
    E = v.shape[-1]
    tile, state, docs_spec, smem = _specs(static)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, static=static),
        grid=(B, H, static.chunks),
        in_specs=[smem, smem, docs_spec, tile(D), tile(D), tile(E), state(D, E)],
        out_specs=[tile(E), state(D, E)],
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, E), F32), jax.ShapeDtypeStruct((B, H, D, E), F32)],
        scratch_shapes=[pltpu.VMEM((D, E), F32), pltpu.VMEM((1, 1), F32)],  # the state, its poison
        compiler_params=_params(),
        interpret=static.interpret,
        name="attnjax_lightning_fwd_tpu",
    )(a, edges, docs, q, k, v, s0)


def _backward(static, q, k, v, a, edges, docs, s0, do, dsT):
    B, H, Tp, D = q.shape
    E = v.shape[-1]
    tile, state, docs_spec, smem = _specs(static)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, static=static),
        grid=(B, H, static.chunks),
        in_specs=[smem, smem, docs_spec, tile(D), tile(E), tile(E), state(D, E)],
        out_specs=tile(D),
        out_shape=jax.ShapeDtypeStruct((B, H, Tp, D), F32),
        scratch_shapes=[pltpu.VMEM((D, E), F32)],
        compiler_params=_params(),
        interpret=static.interpret,
        name="attnjax_lightning_dq_tpu",
    )(a, edges, docs, k, v, do, s0)
    tile, state, docs_spec, smem = _specs(static, reverse=True)
    dk, dv, ds0 = pl.pallas_call(
        functools.partial(_dkv_kernel, static=static),
        grid=(B, H, static.chunks),
        in_specs=[smem, smem, docs_spec, tile(D), tile(D), tile(E), tile(E), state(D, E)],
        out_specs=[tile(D), tile(E), state(D, E)],
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, D), F32), jax.ShapeDtypeStruct((B, H, Tp, E), F32),
                   jax.ShapeDtypeStruct((B, H, D, E), F32)],
        scratch_shapes=[pltpu.VMEM((D, E), F32)],
        compiler_params=_params(),
        interpret=static.interpret,
        name="attnjax_lightning_dkv_tpu",
    )(a, edges, docs, q, k, v, do, dsT)
    return dq, dk, dv, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lightning(static, q, k, v, a, edges, docs, s0):
    return _forward(static, q, k, v, a, edges, docs, s0)


def _lightning_fwd(static, q, k, v, a, edges, docs, s0):
    out, final = _forward(static, q, k, v, a, edges, docs, s0)
    return (out, final), (q, k, v, a, edges, docs, s0, final)


def _lightning_bwd(static, res, cotangents):
    q, k, v, a, edges, docs, s0, final = res
    do, dsT = cotangents
    dq, dk, dv, ds0 = _backward(static, q, k, v, a, edges, docs, s0, do.astype(F32), dsT.astype(F32))
    # d log_decay: sum_t (t + 1) (q_t . dq_t - k_t . dk_t) + T <dS_T, S_T>, per head.
    pos = jnp.arange(1, q.shape[2] + 1, dtype=F32)[:, None]
    dA = (q.astype(F32) * dq).sum(-1) - (k.astype(F32) * dk).sum(-1)  # [B, H, Tp]; 0 on padding
    da = (dA @ pos)[..., 0].sum(0) + static.length * (dsT.astype(F32) * final).sum((0, 2, 3))
    cast = lambda g, x: g.astype(x.dtype)
    return cast(dq, q), cast(dk, k), cast(dv, v), da.reshape(a.shape), None, None, ds0


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


# ---------------------------------------------------------------------------------------------
# Entry point


def lightning(q, k, v, a, docs, s0, scale: float, block_size: int | None = None):
    """Lightning attention on TPU; the problem as in :mod:`attnjax.ops.lightning` (``k, v`` with
    one head per query head). Returns ``(out [B, T, H, E] float32, final_state [B, H, D, E]
    float32)``. Declines (NotImplementedError, at trace time) chunks that are not multiples of
    128 and a document-edge table too large for SMEM."""
    backend.require_supported("lightning")
    B, T, H, D = q.shape
    E = v.shape[-1]
    C = block_size or BlockSizes().resolve("lightning", "tpu").block_q
    if C % LANES:
        raise NotImplementedError(f"TPU lightning chunks must be multiples of {LANES}; got block_size={C}")
    C = min(C, round_up(T, LANES))
    Tp = round_up(T, C)
    n = Tp // C
    if B * n * EDGES * 4 > SMEM_TABLE_LIMIT:
        raise NotImplementedError(f"the TPU lightning kernel's document table ({B * n} chunks) exceeds SMEM")

    docs = jnp.pad(docs.astype(jnp.int32), ((0, 0), (0, Tp - T)), mode="edge")  # pads join the last document
    chunks = docs.reshape(B, n, C)
    first, last = chunks[:, :, 0], chunks[:, :, -1]
    prev = jnp.concatenate([first[:, :1], last[:, :-1]], axis=1)
    nxt = jnp.concatenate([first[:, 1:], last[:, -1:]], axis=1)
    edges = jnp.stack([first, last, prev, nxt], axis=-1).reshape(-1).astype(F32)  # ids are exact in f32
    heads_major = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    static = _Static(length=T, block=C, chunks=n, scale=float(scale), interpret=backend.tpu_interpret_params())
    out, final = _lightning(static, heads_major(q), heads_major(k), heads_major(v), a.astype(F32).reshape(H),
                            edges, docs.astype(F32)[:, None, :], s0.astype(F32))
    return out[:, :, :T].transpose(0, 2, 1, 3), final
