r"""Pallas kernels for lightning attention: chunked forward, recomputing backward, f32 state.

One program per (batch, head). It walks the sequence in chunks of ``C`` tokens, keeping the
``[D, E]`` state in float32 as a loop carry (registers / VMEM), never in HBM:

    forward:   O_i = (Q_i K_i^T * M_i) V_i + (Q_i * qw_i) S_{i-1}
               S_i = keep_i S_{i-1} + (K_i * w_i)^T V_i
    backward:  dQ_i = (dO_i V_i^T * M_i) K_i + (dO_i * qw_i) S_{i-1}^T        (forward sweep)
               dK_i = (dO_i V_i^T * M_i)^T Q_i + (V_i * w'_i) G^T               (reverse sweep)
               dV_i = (Q_i K_i^T * M_i)^T dO_i + (K_i * w'_i) G
               G    = keep'_i G + (Q_i * qw'_i)^T dO_i,   G starts as dS_T; dS_0 = G at the end

``M_i[j, l] = lambda^{j-l} [l <= j][same document]``; the weights ``qw, w, keep`` (and their
primed reverse twins) are decays ``lambda^m`` times "no document boundary in between". All
decay exponents are ``<= 0``. The backward recomputes the states instead of storing them, so
its memory is that of its inputs and outputs. ``d log_decay`` comes from the identity for
cumulative log-gates (as in Gated Linear Attention): ``dA_t = q_t . dq_t - k_t . dk_t``
(plus ``<dS_T, S_T>`` at the last token), with ``A_t = (t + 1) log lambda``.

Kernels read the public ``[B, T, H, D]`` layout in place (a program's block is one head's
``[T, D]`` slab, strided rows; no transposes in HBM), ``T`` padded to a multiple of ``C`` with
zero keys and zero decay (padded steps leave the state untouched). On GPU, ``D`` and ``E`` are
zero-padded to powers of two (Triton block shapes), which changes nothing numerically; there
is no upper limit on ``D``/``E`` other than the state fitting on chip.

Precision: chunk-local products (``Q K^T``, ``P V`` and their backward twins) take operands in
the input dtype (bf16 on tensor cores) with float32 accumulation; every product with the state
and the state itself are float32; the scale is applied to float32 results.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.core import tiling
from attnjax.core.utils import log_power, round_up

from .. import backend

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Static:
    length: int  # real tokens T (the arrays hold n * block)
    block: int
    scale: float


def _dot(x, y, contract=(1, 0), dtype=F32):
    """``x @ y`` contracting ``x``'s axis ``contract[0]`` with ``y``'s ``contract[1]``, float32 result.

    Operands are cast to ``dtype``: the input dtype for the chunk-local products (bf16 inputs use
    the tensor cores, float32 accumulation), float32 for products with the state.
    """
    dims = (((contract[0],), (contract[1],)), ((), ()))
    prec = lax.Precision.HIGHEST if dtype == F32 else lax.Precision.DEFAULT
    return lax.dot_general(x.astype(dtype), y.astype(dtype), dims, preferred_element_type=F32, precision=prec)


def decay_mask(ok, decay, poison=None):
    """A chunk's mask ``M``: ``exp(decay)`` where ``ok`` (causal and same document), else exactly
    0 (``exp(-inf)``: zero values and zero gradients); ``poison`` (NaN or 0, broadcasting to the
    mask) goes into the exponent, so it reaches allowed entries only. Shared with the TPU kernel."""
    exponent = decay if poison is None else decay + poison
    return jnp.exp(jnp.where(ok, exponent, -jnp.inf))


class _Chunk:
    """Decays and document masks of chunk ``i`` (all exponents ``<= 0``). Decays are powers
    ``lambda^m`` of integer step counts ``m`` (``log_power``: exact for ``lambda = 0``, where a
    difference of log decays would be ``-inf + inf``)."""

    def __init__(self, static: _Static, a, d_ref, i):
        C = static.block
        self.start = pl.multiple_of(i * C, C)
        j = lax.broadcasted_iota(jnp.int32, (C,), 0)
        real = jnp.clip(static.length - self.start, 0, C)
        m = jnp.minimum(j + 1, real)  # [C] decay steps from the chunk start (padding adds none)
        self.A = log_power(a, m)  # [C] log decay from chunk start
        self.A_last = log_power(a, real)  # scalar
        self.A_rest = log_power(a, real - m)  # [C]: A_last - A
        self.doc = d_ref[0, pl.ds(self.start, C)]  # [C]
        self.doc_first = d_ref[0, pl.ds(self.start, 1)]  # [1]
        self.doc_last = d_ref[0, pl.ds(self.start + C - 1, 1)]  # [1]
        row = lax.broadcasted_iota(jnp.int32, (C, C), 0)
        col = lax.broadcasted_iota(jnp.int32, (C, C), 1)
        self._ok = (row >= col) & (self.doc[:, None] == self.doc[None, :])
        self._decay = log_power(a, m[:, None] - m[None, :])  # [C, C], used where _ok only

    def mask(self, poison=None):
        """``M [C, C]`` (:func:`decay_mask`), ``poison`` broadcasting to ``[C, C]``."""
        return decay_mask(self._ok, self._decay, poison)

    def rows(self, ref, C):
        return ref[pl.ds(self.start, C), :]  # [C, width], input dtype

    def clean_rows(self, ref, C):
        """The chunk's rows with non-finite entries zeroed, and their poison ``[C]`` (NaN or 0)."""
        return tiling.finite_or_zero(self.rows(ref, C))


def _fwd_kernel(a_ref, d_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, sT_ref, *, static: _Static):
    # Non-finite inputs reach only the tokens that attend them (as attnjax.ops.lightning.xla):
    # q, k, v enter the products zeroed, and their poison (NaN) enters the exponents of the
    # decays, where the mask's -inf removes it: the chunk's mask gets each row's own query poison
    # and each column's key/value poison; the state stays finite and carries its poison beside
    # it (a [1] scalar), which crosses a document boundary by where and enters the decays of the
    # rows that read the state.
    C, n = static.block, q_ref.shape[0] // static.block
    a, lo = a_ref[0, 0], q_ref.dtype

    def body(i, carry):
        S, poison, doc_prev = carry  # [D, E] float32 (finite), [1] its poison, [1]
        c = _Chunk(static, a, d_ref, i)
        (q, pq), (k, pk), (v, pv) = c.clean_rows(q_ref, C), c.clean_rows(k_ref, C), c.clean_rows(v_ref, C)
        pkv = pk + pv  # [C]
        reads = c.doc == doc_prev  # [C]: the state reaches these rows
        qw = jnp.exp(jnp.where(reads, c.A + poison, -jnp.inf))  # [C]
        p = _dot(q, k, (1, 1), lo) * c.mask(pq[:, None] + pkv[None, :])  # [C, C]
        o = _dot(p, v, dtype=lo) + _dot(q.astype(F32) * qw[:, None], S)  # [C, E]
        o_ref[pl.ds(c.start, C), :] = (static.scale * o).astype(o_ref.dtype)
        in_last = c.doc == c.doc_last  # [C]: the keys the state after the chunk holds
        w = jnp.exp(jnp.where(in_last, c.A_rest, -jnp.inf))  # [C]
        cont = c.doc_last == doc_prev  # [1]
        keep = jnp.where(cont, jnp.exp(c.A_last), 0.0)  # [1]
        S = keep[:, None] * S + _dot(k.astype(F32) * w[:, None], v, (0, 0), lo)
        poison = jnp.where(cont, poison, 0.0) + jnp.where(in_last, pkv, 0.0).sum()
        return S, poison, c.doc_last

    s0, p0 = tiling.finite_or_zero(s0_ref[...].astype(F32))  # p0 [D]
    init = (s0, jnp.zeros((1,), F32) + p0.sum(), d_ref[0, pl.ds(0, 1)])
    S, poison, _ = lax.fori_loop(0, n, body, init)
    sT_ref[...] = S + poison[:, None]


def _bwd_kernel(a_ref, d_ref, q_ref, k_ref, v_ref, s0_ref, do_ref, dsT_ref,
                dq_ref, dk_ref, dv_ref, ds0_ref, *, static: _Static):
    # The scale is folded into dO: o = scale * (...) means every gradient sees scale * dO.
    # Inputs enter with non-finite entries zeroed (the forward's poison is not recomputed): the
    # masks are exact zeros, so masked entries contribute exactly nothing (no 0 * NaN).
    C, n = static.block, q_ref.shape[0] // static.block
    a, lo = a_ref[0, 0], q_ref.dtype
    d_out = lambda c: static.scale * c.rows(do_ref, C).astype(F32)  # [C, E]
    clean = lambda c, ref: tiling.zero_non_finite(c.rows(ref, C))[0]

    def forward_sweep(i, carry):  # dQ, recomputing the states
        S, doc_prev = carry
        c = _Chunk(static, a, d_ref, i)
        k, v, do = clean(c, k_ref), clean(c, v_ref), d_out(c)
        qw = jnp.exp(jnp.where(c.doc == doc_prev, c.A, -jnp.inf))
        dp = _dot(do, v, (1, 1), lo) * c.mask()  # [C, C]
        dq = _dot(dp, k, dtype=lo) + _dot(do * qw[:, None], S, (1, 1))  # [C, D]
        dq_ref[pl.ds(c.start, C), :] = dq.astype(dq_ref.dtype)
        w = jnp.exp(jnp.where(c.doc == c.doc_last, c.A_rest, -jnp.inf))
        keep = jnp.where(c.doc_last == doc_prev, jnp.exp(c.A_last), 0.0)
        return keep[:, None] * S + _dot(k.astype(F32) * w[:, None], v, (0, 0), lo), c.doc_last

    (s0,) = tiling.zero_non_finite(s0_ref[...].astype(F32))
    lax.fori_loop(0, n, forward_sweep, (s0, d_ref[0, pl.ds(0, 1)]))

    def reverse_sweep(r, carry):  # dK, dV and the state cotangent G, last chunk first
        G, doc_next = carry  # [D, E]: d loss / d state, decayed into the previous chunk; [1]
        c = _Chunk(static, a, d_ref, n - 1 - r)
        q, k, v, do = clean(c, q_ref), clean(c, k_ref), clean(c, v_ref), d_out(c)
        w = jnp.exp(jnp.where(c.doc == doc_next, c.A_rest, -jnp.inf))  # [C]: G reaches these keys
        M = c.mask()  # [C, C]
        p = _dot(q, k, (1, 1), lo) * M  # [C, C]
        dp = _dot(do, v, (1, 1), lo) * M  # [C, C]
        dv = _dot(p, do, (0, 0), lo) + _dot(k.astype(F32) * w[:, None], G)  # [C, E]
        dk = _dot(dp, q, (0, 0), lo) + _dot(v.astype(F32) * w[:, None], G, (1, 1))  # [C, D]
        dv_ref[pl.ds(c.start, C), :] = dv.astype(dv_ref.dtype)
        dk_ref[pl.ds(c.start, C), :] = dk.astype(dk_ref.dtype)
        qw = jnp.exp(jnp.where(c.doc == c.doc_first, c.A, -jnp.inf))  # [C]
        keep = jnp.where(c.doc_first == doc_next, jnp.exp(c.A_last), 0.0)  # [1]
        return keep[:, None] * G + _dot(q.astype(F32) * qw[:, None], do, (0, 0)), c.doc_first

    init = (dsT_ref[...].astype(F32), d_ref[0, pl.ds(n * C - 1, 1)])
    G, _ = lax.fori_loop(0, n, reverse_sweep, init)
    ds0_ref[...] = G


# -- pallas_call wrappers (arrays [B, Tp, H, *]) ------------------------------------------------


def _seq_spec(Tp, width):
    return pl.BlockSpec((None, Tp, None, width), lambda b, h: (b, 0, h, 0))


def _state_spec(D, E):
    return pl.BlockSpec((None, None, D, E), lambda b, h: (b, h, 0, 0))


def _common_specs(Tp):
    return [pl.BlockSpec((1, 1), lambda b, h: (h, 0)),  # log decay, [H, 1]
            pl.BlockSpec((None, 1, Tp), lambda b, h: (b, 0, 0))]  # document ids, [B, 1, Tp]


def _cost(B, H, Tp, C, D, E, passes):
    flops = 2 * B * H * Tp * (C * (D + E) + 2 * D * E) * passes
    return pl.CostEstimate(flops=flops, transcendentals=B * H * Tp * C * passes, bytes_accessed=0)


def _forward_call(static, q, k, v, a, docs, s0):
    B, Tp, H, D = q.shape
    E = v.shape[-1]
    out_shape = (jax.ShapeDtypeStruct((B, Tp, H, E), F32), jax.ShapeDtypeStruct((B, H, D, E), F32))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, static=static),
        grid=(B, H),
        in_specs=[*_common_specs(Tp), _seq_spec(Tp, D), _seq_spec(Tp, D), _seq_spec(Tp, E),
                  _state_spec(D, E)],
        out_specs=(_seq_spec(Tp, E), _state_spec(D, E)),
        out_shape=out_shape,
        cost_estimate=_cost(B, H, Tp, static.block, D, E, 1),
        interpret=backend.interpret(),
        **backend.compiler_params("lightning", max(D, E)),
        name="lightning_fwd",
    )(a, docs, q, k, v, s0)


def _backward_call(static, q, k, v, a, docs, s0, do, dsT):
    B, Tp, H, D = q.shape
    E = v.shape[-1]
    shapes = ((B, Tp, H, D), (B, Tp, H, D), (B, Tp, H, E), (B, H, D, E))  # dq, dk, dv, ds0
    out_shape = tuple(jax.ShapeDtypeStruct(s, F32) for s in shapes)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, static=static),
        grid=(B, H),
        in_specs=[*_common_specs(Tp), _seq_spec(Tp, D), _seq_spec(Tp, D), _seq_spec(Tp, E), _state_spec(D, E),
                  _seq_spec(Tp, E), _state_spec(D, E)],
        out_specs=(_seq_spec(Tp, D), _seq_spec(Tp, D), _seq_spec(Tp, E), _state_spec(D, E)),
        out_shape=out_shape,
        cost_estimate=_cost(B, H, Tp, static.block, D, E, 2),
        interpret=backend.interpret(),
        **backend.compiler_params("lightning", max(D, E)),
        name="lightning_bwd",
    )(a, docs, q, k, v, s0, do, dsT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lightning(static, q, k, v, a, docs, s0):
    return _forward_call(static, q, k, v, a, docs, s0)


def _lightning_fwd(static, q, k, v, a, docs, s0):
    out, final = _forward_call(static, q, k, v, a, docs, s0)
    return (out, final), (q, k, v, a, docs, s0, final)


def _lightning_bwd(static, res, cotangents):
    q, k, v, a, docs, s0, final = res
    do, dsT = cotangents
    dq, dk, dv, ds0 = _backward_call(static, q, k, v, a, docs, s0, do.astype(F32), dsT.astype(F32))
    # d log_decay: sum_t (t + 1) (q_t . dq_t - k_t . dk_t) + T <dS_T, S_T>, per head.
    pos = jnp.arange(1, q.shape[1] + 1, dtype=F32)[:, None]
    dA = (q.astype(F32) * dq).sum(-1) - (k.astype(F32) * dk).sum(-1)  # [B, Tp, H]; 0 on padding
    da = (dA * pos).sum((0, 1)) + static.length * (dsT.astype(F32) * final).sum((0, 2, 3))
    cast = lambda g, x: g.astype(x.dtype)
    return cast(dq, q), cast(dk, k), cast(dv, v), da.reshape(a.shape), None, ds0


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def lightning(q, k, v, a, docs, s0, scale: float, block_size: int):
    """Lightning attention with the Pallas kernels; the problem as in :mod:`attnjax.ops.lightning`.

    Returns ``(out [B, T, H, E] float32, final_state [B, H, D, E] float32)``.
    """
    if backend.platform() == "tpu":  # the TPU kernels have their own layout (kernels_pallas/lightning/tpu.py)
        from . import tpu

        return tpu.lightning(q, k, v, a, docs, s0, scale, block_size)
    backend.require_supported("lightning")
    B, T, H, D = q.shape
    E = v.shape[-1]
    # Declines here, at trace time, what has no launch configuration (GPU head dims over 128:
    # the two [D, E] float32 states of the backward no longer fit on chip).
    backend.compiler_params("lightning", backend.pad_head_dim(max(D, E)))
    C = backend.clip_tile(block_size, T)
    Tp = round_up(T, C)
    pd, pe = backend.pad_head_dim(D) - D, backend.pad_head_dim(E) - E

    def seq(x, pad_last):  # [B, T, H, *] -> [B, Tp, H, *]
        if Tp == T and pad_last == 0:
            return x
        return jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, pad_last)))

    docs = jnp.pad(docs, ((0, 0), (0, Tp - T)), mode="edge")[:, None, :]  # pads join the last document
    s0 = jnp.pad(s0, ((0, 0), (0, 0), (0, pd), (0, pe)))
    static = _Static(length=T, block=C, scale=float(scale))
    out, final = _lightning(static, seq(q, pd), seq(k, pd), seq(v, pe), a.reshape(H, 1), docs, s0)
    return out[:, :T, :, :E], final[:, :, :D, :E]
