"""Neighborhood attention in pure JAX with cost proportional to the window, not the sequence.

Queries are cut into multi-dimensional tiles (``BlockSizes.spatial``, by default 8x8 in 2-D) *inside each
dilation group*; for every tile the keys it can see form a box (its "halo": per axis the range
``[lo(first query), hi(last query)]``, at most ``tile + kernel - 1`` long for stride 1). All
window arithmetic is static (shapes and kernel are Python ints), so the halo of every tile is a
trace-time numpy table, and the op is: gather query tiles and key/value halos with static
indices (one ``take`` per axis), dense attention inside each (tile, halo) pair with the per-axis
masks ANDed together, and a static gather back to the grid.

Why a gather formulation and not a ``custom_vjp``: every step is differentiable by plain
autodiff (the transpose of a static-index ``take`` is a scatter-add of the halo gradients), so the
backward is exact and deterministic with no hand-written code to drift from the forward. The
cost is memory: autodiff keeps the tile probabilities, ``O(T * halo * H)`` floats, which is
proportional to the window (use ``jax.checkpoint`` around the op to trade it for recomputation).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax.core import tiling
from attnjax.core.utils import precision
from attnjax.masks.neighborhood import AxisWindow

_MASKED = -1e30  # finite: exp() underflows to 0 and gradients of masked logits stay finite


class _AxisPlan:
    """Static tables of one axis: query tiles and key halos per (dilation group, tile)."""

    def __init__(self, ax: AxisWindow, tile: int):
        n, d = ax.extent, ax.dilation
        m = -(-n // d)  # longest group
        bq = min(tile, m)
        nt = -(-m // bq)
        g = np.arange(d)[:, None]
        n_g = ax.group_len(g, np)  # [d, 1]
        t_first = np.arange(nt)[None, :] * bq  # [1, nt]
        t_last = np.minimum(t_first + bq - 1, n_g - 1)
        tile_valid = t_first <= n_g - 1
        lo, _ = ax.window(np.minimum(t_first, n_g - 1), n_g, np)
        _, hi = ax.window(t_last, n_g, np)
        start = np.where(tile_valid, lo, 0)  # [d, nt]
        span = int(np.max(np.where(tile_valid, hi - start + 1, 1)))

        t = t_first[..., None] + np.arange(bq)  # [1, nt, bq] query group coordinates
        u = start[..., None] + np.arange(span)  # [d, nt, span] key group coordinates
        self.q_index = (np.minimum(t, n_g[..., None] - 1) * d + g[..., None]).astype(np.int32)
        self.k_index = (np.minimum(u, n_g[..., None] - 1) * d + g[..., None]).astype(np.int32)
        lo_t, hi_t = ax.window(np.minimum(t, n_g[..., None] - 1), n_g[..., None], np)  # [d, nt, bq]
        self.mask = (
            (u[:, :, None, :] < n_g[..., None, None])
            & (u[:, :, None, :] >= lo_t[..., None])
            & (u[:, :, None, :] <= hi_t[..., None])
        )  # [d, nt, bq, span]
        # Where each grid position lands in the flattened (d, nt, bq) layout.
        x = np.arange(n)
        self.out_index = ((x % d) * nt * bq + (x // d)).astype(np.int32)
        self.d, self.nt, self.bq, self.span = d, nt, bq, span


def neighborhood_attention(q, k, v, axes: tuple[AxisWindow, ...], scale: float, tile: tuple[int, ...]):
    """``q [B, *spatial, H, D]``, ``k/v [B, *spatial, K, D/E]`` -> ``[B, *spatial, H, E]``, with
    query tiles of shape ``tile`` (per dilation group)."""
    r = len(axes)
    plans = [_AxisPlan(ax, t) for ax, t in zip(axes, tile)]
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    K, E = k.shape[-2], v.shape[-1]

    def gather(x, index_of):
        # Axis a of the grid becomes (d_a, nt_a, w_a); grid axes move right as they expand.
        for a, p in enumerate(plans):
            x = jnp.take(x, jnp.asarray(index_of(p)), axis=1 + 3 * a)
        # [B, d0, nt0, w0, d1, nt1, w1, ..., heads, dim] -> [B, P, W, heads, dim]
        outer = [1 + 3 * a + i for a in range(r) for i in (0, 1)]
        inner = [1 + 3 * a + 2 for a in range(r)]
        x = x.transpose(0, *outer, *inner, 3 * r + 1, 3 * r + 2)
        n_p = math.prod(p.d * p.nt for p in plans)
        return x.reshape(B, n_p, -1, *x.shape[-2:])

    # Every (tile, halo) pair has masked entries: non-finite inputs must reach only the allowed
    # ones, so a NaN pixel reaches only the queries whose window holds it. q, k, v are zeroed where
    # non-finite once on the grid (O(N D), not per gathered halo): the products never see 0 * NaN.
    # Each query's output then gets its poison (NaN or 0): its own query's, and NaN if its window
    # holds a non-finite key or value (a product of the static mask with the halo's poisons).
    (q, pq), (k, pk), (v, pv) = (tiling.finite_or_zero(x) for x in (q, k, v))
    qt = gather(q, lambda p: p.q_index)  # [B, P, Q, H, D]
    # The keys' flags ride along in the keys' gather (one more feature) rather than in their own.
    kt = gather(jnp.concatenate([k, jnp.isnan(pk + pv)[..., None].astype(k.dtype)], -1), lambda p: p.k_index)
    kt, bad = kt[..., :D], kt[..., D].astype(jnp.float32)  # [B, P, W, K, D], [B, P, W, K]
    vt = gather(v, lambda p: p.k_index)  # [B, P, W, K, E]

    # Combined mask [P, Q, W] as the AND of per-axis [d, nt, bq, span] tables (static).
    ok = None
    for a, p in enumerate(plans):
        shape = [1] * (4 * r)
        for pos, size in zip((2 * a, 2 * a + 1, 2 * r + a, 3 * r + a), (p.d, p.nt, p.bq, p.span)):
            shape[pos] = size
        m = p.mask.reshape(shape)
        ok = m if ok is None else ok & m
    n_p = math.prod(p.d * p.nt for p in plans)
    ok = jnp.asarray(ok.reshape(n_p, math.prod(p.bq for p in plans), math.prod(p.span for p in plans)))

    n_q, n_w, G = qt.shape[2], kt.shape[2], H // K
    qg = qt.reshape(B, n_p, n_q, K, G, D)
    s = jnp.einsum("bpqkgd,bpwkd->bpkgqw", qg, kt, preferred_element_type=jnp.float32,
                   precision=precision(q.dtype)) * scale
    allowed = ok[None, :, None, None]  # [1, P, 1, 1, Q, W]
    s = jnp.where(allowed, s, _MASKED)
    # Every row has at least one allowed key (padded query rows take the window of the last real
    # query of their group), so exp(_MASKED - max) underflows to exactly 0 with no extra select.
    m = lax.stop_gradient(s.max(-1, keepdims=True))
    p = jnp.exp(s - m)
    l = p.sum(-1)[..., None]  # [B, P, K, G, Q, 1]
    out = jnp.einsum("bpkgqw,bpwke->bpkgqe", p, vt, preferred_element_type=jnp.float32,
                     precision=precision(v.dtype))
    out = (out / l).transpose(0, 1, 4, 2, 3, 5)  # [B, P, Q, K, G, E]
    seen = jnp.einsum("pqw,bpwk->bpqk", ok.astype(jnp.float32), bad, precision=lax.Precision.HIGHEST)
    out = out + jnp.where(seen > 0, jnp.nan, 0.0)[..., None, None]
    out = out.reshape(B, *[x for p_ in plans for x in (p_.d, p_.nt)], *[p_.bq for p_ in plans], H, E)
    # [B, d0, nt0, d1, nt1, bq0, bq1, H, E] -> [B, (d0 nt0 bq0), (d1 nt1 bq1), H, E] -> grid
    order = [x for a in range(r) for x in (1 + 2 * a, 2 + 2 * a, 1 + 2 * r + a)]
    out = out.transpose(0, *order, 3 * r + 1, 3 * r + 2)
    out = out.reshape(B, *[p_.d * p_.nt * p_.bq for p_ in plans], H, E)
    for a, p_ in enumerate(plans):
        out = jnp.take(out, jnp.asarray(p_.out_index), axis=1 + a)
    return (out + pq[..., None]).astype(q.dtype)  # a non-finite query poisons its own output
