r"""Bi-level routing attention ("BiFormer: Vision Transformer with Bi-Level Routing Attention",
Zhu et al., CVPR 2023).

Tokens are cut into ``n`` regions of ``R`` tokens (1-D: consecutive runs; 2-D: ``rh x rw``
windows of a feature map). Routing happens between regions, attention between tokens:

.. math::

    A^r = \bar Q \bar K^\top \in \mathbb{R}^{n \times n}, \qquad
    I_i = \mathrm{TopK}_j(A^r_{ij}), \qquad
    O_t = \mathrm{softmax}\big(\tfrac{1}{\sqrt D} q_t K_{I_{r(t)}}^\top\big) V_{I_{r(t)}},

where ``\bar Q``, ``\bar K`` are the region means of the queries and keys (summed over heads, as
the paper routes once for all heads), ``r(t)`` is token ``t``'s region and ``K_{I}`` the keys of
the ``top_k`` routed regions gathered together. The gathered path costs
``O(n^2 H D + T * top_k * R * H D)`` (the paper's ``O((HW)^{4/3})`` with ``n ~ (HW)^{2/3}``)
instead of ``O(T^2 H D)``. The top-k choice is not differentiable: gradients flow to q, k, v for
the routing held fixed (the indices are computed under ``stop_gradient``).

Ragged sizes are padded to whole regions: padded keys are masked, region means count real
tokens only, padded queries are dropped.

**Conventions** (``convention=``). ``"paper"`` (default) is the above. ``"official"`` is the
released code (rayleizhu/BiFormer, ``BiLevelRoutingAttention``), which differs in two places:
the default logit scale is ``qk_dim ** -0.5`` with ``qk_dim = H * D`` the width of all heads
together (not one head's ``D``), and with ``auto_pad`` ragged maps are zero-padded to whole
regions and the padded tokens are then ordinary tokens: they count in the region means and are
attended as keys (outputs at padded positions are cropped). Here padding happens after the
projections, so padded tokens are zeros; the official code pads *before* its ``qkv`` linear, so
its padded tokens are the projection's bias. For projections with a bias, pad ``x`` yourself,
project, and call the op on the padded (whole-region) map, as the official code does.

Letter legend: B batch, T = S tokens, H heads, K key/value heads, D head dim, E value head dim,
n regions, R tokens per region.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from attnjax import _checks, masks
from attnjax.core import dispatch
from attnjax.ops.sparse.common import GROUP_IMPLEMENTATION
from attnjax.core.tiling import scores
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention


def _sizes(x, region_size):
    """``(spatial, region)`` tuples for a 1-D ``[B, T, H, D]`` or 2-D ``[B, X, Y, H, D]`` input."""
    spatial = tuple(x.shape[1:-2])
    region = (region_size,) * len(spatial) if isinstance(region_size, int) else tuple(region_size)
    if len(region) != len(spatial):
        raise ValueError(f"region_size {region_size!r} must have one entry per spatial axis of {spatial}")
    return spatial, tuple(_checks.positive_int("region_size", r) for r in region)


def _to_regions(x, region):
    """``[B, *spatial, K, D] -> ([B, n, R, K, D], valid [n, R])``, padding to whole regions."""
    B, *spatial, K, D = x.shape
    counts = [-(-s // r) for s, r in zip(spatial, region)]
    pads = [c * r - s for c, r, s in zip(counts, region, spatial)]
    x = jnp.pad(x, ((0, 0), *((0, p) for p in pads), (0, 0), (0, 0)))
    valid = jnp.pad(jnp.ones(spatial, bool), [(0, p) for p in pads])
    if len(spatial) == 1:
        return x.reshape(B, counts[0], region[0], K, D), valid.reshape(counts[0], region[0])
    (nx, ny), (rx, ry) = counts, region
    x = x.reshape(B, nx, rx, ny, ry, K, D).transpose(0, 1, 3, 2, 4, 5, 6)
    valid = valid.reshape(nx, rx, ny, ry).transpose(0, 2, 1, 3)
    return x.reshape(B, nx * ny, rx * ry, K, D), valid.reshape(nx * ny, rx * ry)


def _from_regions(x, spatial, region):
    """Inverse of :func:`_to_regions` for outputs ``[B, n, R, H, E]``."""
    B, _, _, H, E = x.shape
    counts = [-(-s // r) for s, r in zip(spatial, region)]
    if len(spatial) == 1:
        return x.reshape(B, counts[0] * region[0], H, E)[:, : spatial[0]]
    (nx, ny), (rx, ry) = counts, region
    x = x.reshape(B, nx, ny, rx, ry, H, E).transpose(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(B, nx * rx, ny * ry, H, E)[:, : spatial[0], : spatial[1]]


def _region_ids(spatial, region) -> Array:
    """The region of every token, flattened row-major (``[prod(spatial)]``)."""
    if len(spatial) == 1:
        return jnp.arange(spatial[0]) // region[0]
    ny = -(-spatial[1] // region[1])
    rows = jnp.arange(spatial[0])[:, None] // region[0]
    cols = jnp.arange(spatial[1])[None, :] // region[1]
    return (rows * ny + cols).reshape(-1)


def bilevel_routing(
    q: Float[Array, "B *N H D"],
    k: Float[Array, "B *N K D"],
    *,
    region_size: int | tuple[int, int],
    top_k: int,
    convention: str = "paper",
) -> Int[Array, "B n top_k"]:
    """The routed regions ``[B, n, top_k]`` of every query region (most affine first).

    Affinity is ``mean-query(i) . mean-key(j)`` summed over heads (query head ``h`` with key head
    ``h // (H // K)``); it is computed under ``stop_gradient``. Region means count real tokens
    only (``convention="paper"``) or the zero padding too (``"official"``).

    >>> import jax
    >>> from attnjax import ops
    >>> q = k = jax.random.normal(jax.random.key(0), (1, 12, 2, 4))
    >>> ops.bilevel_routing(q, k, region_size=4, top_k=2).shape
    (1, 3, 2)
    """
    spatial, region = _sizes(q, region_size)
    qr, valid = _to_regions(lax.stop_gradient(q).astype(jnp.float32), region)
    kr, _ = _to_regions(lax.stop_gradient(k).astype(jnp.float32), region)
    n = qr.shape[1]
    top_k = _checks.positive_int("top_k", top_k)
    if top_k > n:
        raise ValueError(f"top_k={top_k} must be <= the number of regions n={n}")
    if _checks.convention(convention) == "official":  # padded zeros count in the means
        valid = jnp.ones_like(valid)
    w = (valid / valid.sum(1, keepdims=True))[None, :, :, None, None]
    q_mean, k_mean = (qr * w).sum(2), (kr * w).sum(2)  # [B, n, H|K, D]
    affinity = scores(q_mean, k_mean, 1.0).sum(1)  # [B, n, n]
    return lax.top_k(affinity, top_k)[1].astype(jnp.int32)


def biformer_attention(
    q: Float[Array, "B *N H D"],
    k: Float[Array, "B *N K D"],
    v: Float[Array, "B *N K E"],
    *,
    region_size: int | tuple[int, int],
    top_k: int,
    routing: Int[Array, "B n top_k"] | None = None,
    scale: float | None = None,
    convention: str = "paper",
    implementation: Implementation = None,
) -> Float[Array, "B *N H E"]:
    """Bi-level routing attention over 1-D ``[B, T, H, D]`` or 2-D ``[B, X, Y, H, D]`` tokens.

    Args:
      q, k, v: queries, keys, values on the same token grid (``K`` divides ``H``).
      region_size: tokens per region (an int, or ``(rx, ry)`` in 2-D).
      top_k: regions each query region attends to.
      routing: precomputed :func:`bilevel_routing` indices (default: computed from q, k):
        distinct regions in ``[0, regions)`` per query region (checked when concrete; traced
        indices outside the range are dropped and repeats count once, as in the reference).
      scale: logit scale, default ``1 / sqrt(D)`` (``"paper"``) or ``1 / sqrt(H * D)``
        (``"official"``).
      convention: ``"paper"`` or ``"official"`` (the released code's scale and padding; module
        docstring).
      implementation: ``"reference"`` (dense attention under the mask of allowed region pairs) or
        ``"xla"``/None (gather the routed regions' keys and values, attend within them).

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 10, 10, 2, 8))  # a 10x10 map
    >>> out = ops.biformer_attention(q, k, v, region_size=4, top_k=3)
    >>> ref = ops.biformer_attention(q, k, v, region_size=4, top_k=3, implementation="reference")
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
    ((1, 10, 10, 2, 8), True)
    """
    rank = getattr(q, "ndim", None)
    if rank not in (4, 5):
        raise ValueError(f"q must be [B, T, H, D] (1-D) or [B, X, Y, H, D] (2-D); got shape {getattr(q, 'shape', None)}")
    if not (k.shape[:-2] == v.shape[:-2] == q.shape[:-2]):
        raise ValueError(f"q, k, v must share the token grid {q.shape[:-2]}; got k {k.shape}, v {v.shape}")
    flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[-2:])
    _checks.check_qkv(flat(q), flat(k), flat(v), same_length=True)
    spatial, region = _sizes(q, region_size)
    if _checks.convention(convention) == "official":
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-2] * q.shape[-1])  # qk_dim ** -0.5, all heads together
        # Zero-pad to whole regions; the padded tokens are then ordinary tokens (region means,
        # keys), as with the official auto_pad. Outputs at padded positions are dropped.
        pads = [(0, -s % r) for s, r in zip(spatial, region)]
        pad = lambda x: jnp.pad(x, ((0, 0), *pads, (0, 0), (0, 0)))
        out = biformer_attention(pad(q), pad(k), pad(v), region_size=region, top_k=top_k, routing=routing,
                                 scale=scale, implementation=implementation)
        return out[(slice(None), *(slice(0, s) for s in spatial))]
    n = math.prod(-(-s // r) for s, r in zip(spatial, region))
    checked = routing is None  # bilevel_routing's indices are in range and distinct
    if routing is None:
        routing = bilevel_routing(q, k, region_size=region, top_k=top_k)
    _checks.check_rank("routing", routing, ("batch", "regions", "top_k"))
    _checks.check_int_array("routing", routing)
    if routing.shape != (q.shape[0], n, routing.shape[-1]):
        raise ValueError(f"routing has shape {routing.shape}; expected [batch={q.shape[0]}, regions={n}, top_k]")
    if not checked and not isinstance(routing, jax.core.Tracer):
        _check_routing_values(np.asarray(routing), n)
        checked = True
    impls = {
        "reference": lambda: _reference(q, k, v, routing, spatial, region, scale),
        "xla": lambda: _gathered(q, k, v, routing, spatial, region, scale, checked),
    }
    return dispatch.run("biformer_attention", impls, implementation)


def _check_routing_values(routing: np.ndarray, n: int) -> None:
    bad = (routing < 0) | (routing >= n)
    if bad.any():
        raise ValueError(f"routing indices must be regions in [0, {n}); got {sorted(set(routing[bad].tolist()))[:8]}")
    ordered = np.sort(routing, axis=-1)
    if (ordered[..., 1:] == ordered[..., :-1]).any():
        raise ValueError("routing must route each query region to distinct regions; got a repeated index")


def _route_ok(routing, n):
    """Which routed slots count, ``[B, n, top_k]``: the reference's set of regions, so traced
    indices outside ``[0, n)`` are dropped and a repeated index counts once."""
    top_k = routing.shape[-1]
    earlier = jnp.tril(jnp.ones((top_k, top_k), bool), -1)
    repeated = ((routing[..., :, None] == routing[..., None, :]) & earlier).any(-1)
    return (routing >= 0) & (routing < n) & ~repeated


def _reference(q, k, v, routing, spatial, region, scale):
    """Dense attention with the mask ``allowed[t, s] = region(s) in routing[region(t)]``."""
    B, n = routing.shape[:2]
    selected = jax.nn.one_hot(routing, n, dtype=jnp.int32).sum(2) > 0  # [B, n, n]
    ids = _region_ids(spatial, region)
    allowed = selected[:, ids][:, :, ids][:, None]  # [B, 1, T, S]
    flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[-2:])
    out = attention(flat(q), flat(k), flat(v), mask=masks.dense(allowed), scale=scale, implementation="reference")
    return out.reshape(*q.shape[:-1], v.shape[-1])


def _gathered(q, k, v, routing, spatial, region, scale, checked: bool):
    """Attention of each query region over the keys/values of its routed regions, gathered.
    Unless ``checked`` (computed or concrete indices), slots the reference would not count
    (outside ``[0, n)``, repeated) are masked."""
    qr, valid = _to_regions(q, region)  # [B, n, R, H, D], [n, R]
    kr, _ = _to_regions(k, region)
    vr, _ = _to_regions(v, region)
    B, n, R, H, D = qr.shape
    top_k = routing.shape[-1]
    route_ok = None if checked else _route_ok(routing, n)
    routing = routing if checked else jnp.clip(routing, 0, n - 1)
    gather = lambda x: jnp.take_along_axis(x, routing.reshape(B, n * top_k, 1, 1, 1), axis=1).reshape(
        B * n, top_k * R, *x.shape[3:]
    )
    kg, vg = gather(kr), gather(vr)  # [B * n, top_k * R, K, .]
    mask = None
    ragged = any(s % r for s, r in zip(spatial, region))
    if ragged or route_ok is not None:  # padded keys and uncounted slots must be masked
        key_ok = valid[routing] if ragged else jnp.ones(routing.shape + (R,), bool)  # [B, n, top_k, R]
        if route_ok is not None:
            key_ok = key_ok & route_ok[..., None]
        key_ok = key_ok.reshape(B * n, top_k * R)
        mask = masks.document(jnp.zeros((B * n, R), jnp.int32), (~key_ok).astype(jnp.int32))
    out = attention(qr.reshape(B * n, R, H, D), kg, vg, mask=mask, scale=scale, implementation=GROUP_IMPLEMENTATION)
    return _from_regions(out.reshape(B, n, R, H, -1), spatial, region)
