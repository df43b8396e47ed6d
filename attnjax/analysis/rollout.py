"""Attribution across layers: attention rollout and attention flow (Abnar & Zuidema, 2020),
and gradient-weighted rollout (Chefer et al., 2021).

Inputs are per-layer weights ``[B, H, T, T]`` (or ``[H, T, T]``), first layer first, as
:meth:`attnjax.analysis.Capture.stacked` returns them. With residual correction each layer's
head-fused map ``A`` becomes ``0.5 A + 0.5 I`` (rows renormalized): half of what a token carries
goes through the skip connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

FUSIONS = ("mean", "max", "min")


def _as_batched(maps: Sequence[Array], name: str = "maps") -> list[Array]:
    if len(maps) == 0:
        raise ValueError(f"{name} must hold at least one layer's weights")
    out = []
    for i, a in enumerate(maps):
        a = jnp.asarray(a, jnp.float32)
        a = a[None] if a.ndim == 3 else a
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(
                f"{name}[{i}] must have shape [B, H, T, T] or [H, T, T] (self-attention); got {a.shape}"
            )
        if out and a.shape[-1] != out[0].shape[-1]:
            raise ValueError(f"{name}[{i}] has {a.shape[-1]} tokens; layer 0 has {out[0].shape[-1]}")
        out.append(a)
    return out


def fuse_heads(a: Float[Array, "B H T S"], head_fusion: str = "mean") -> Float[Array, "B T S"]:
    """One map per example: the mean, max or min over heads."""
    if head_fusion not in FUSIONS:
        raise ValueError(f"head_fusion must be one of {FUSIONS}; got {head_fusion!r}")
    return getattr(jnp, head_fusion)(a, axis=1)


def layer_maps(maps, *, head_fusion="mean", residual=True, grads=None) -> list[Array]:
    """The per-layer ``[B, T, T]`` maps that rollout multiplies: head-fused (gradient-weighted
    ``mean_h relu(grad * A)`` when ``grads`` are given), then residual-corrected."""
    maps = _as_batched(maps)
    if grads is not None:
        grads = _as_batched(grads, "grads")
        if len(grads) != len(maps):
            raise ValueError(f"grads has {len(grads)} layers; maps has {len(maps)}")
        fused = [jnp.maximum(a * g, 0.0).mean(1) for a, g in zip(maps, grads)]
    else:
        fused = [fuse_heads(a, head_fusion) for a in maps]
    if not residual:
        return fused
    eye = jnp.eye(fused[0].shape[-1], dtype=jnp.float32)
    out = []
    for a in fused:
        a = 0.5 * a + 0.5 * eye
        out.append(a / jnp.maximum(a.sum(-1, keepdims=True), 1e-12))
    return out


def rollout(maps, *, head_fusion: str = "mean", residual: bool = True, grads=None) -> Float[Array, "B T T"]:
    """Attention rollout ``R = A_L ... A_2 A_1`` over the layer maps (:func:`layer_maps`):
    ``R[b, i, j]`` is how much output token ``i`` draws from input token ``j``.
    ``grads`` (same shapes as ``maps``, e.g. the gradient of a class logit with respect to the
    weights) gives gradient-weighted rollout.

    >>> import jax.numpy as jnp
    >>> eye = jnp.eye(4)[None, None]  # one head that attends to itself
    >>> bool(jnp.allclose(rollout([eye, eye])[0], jnp.eye(4)))
    True
    """
    layers = layer_maps(maps, head_fusion=head_fusion, residual=residual, grads=grads)
    r = layers[0]
    for a in layers[1:]:
        r = a @ r
    return r


def max_flow(capacity: np.ndarray, source: int, sink: int) -> float:
    """The maximum flow from ``source`` to ``sink`` of a dense capacity matrix (Dinic's
    algorithm, exact for graphs of a few hundred nodes; no dependency beyond numpy)."""
    cap = np.array(capacity, dtype=np.float64)
    if cap.ndim != 2 or cap.shape[0] != cap.shape[1]:
        raise ValueError(f"capacity must be square [N, N]; got {cap.shape}")
    if source == sink:
        raise ValueError("source and sink must differ")
    n = cap.shape[0]
    flow = np.zeros_like(cap)
    eps = 1e-12
    total = 0.0
    while True:
        residual = cap - flow
        level = -np.ones(n, dtype=np.int64)
        level[source] = 0
        queue = deque([source])
        while queue:
            u = queue.popleft()
            for w in np.nonzero((residual[u] > eps) & (level < 0))[0]:
                level[w] = level[u] + 1
                queue.append(w)
        if level[sink] < 0:
            return total
        nxt = [list(np.nonzero((residual[u] > eps) & (level == level[u] + 1))[0]) for u in range(n)]

        def push(u, limit):
            if u == sink:
                return limit
            while nxt[u]:
                w = nxt[u][-1]
                r = cap[u, w] - flow[u, w]
                if r > eps:
                    got = push(w, min(limit, r))
                    if got > eps:
                        flow[u, w] += got
                        flow[w, u] -= got
                        return got
                nxt[u].pop()
            return 0.0

        while True:
            got = push(source, np.inf)
            if got <= eps:
                break
            total += got


def flow(
    maps, *, head_fusion: str = "mean", residual: bool = True, tokens: Sequence[int] | None = None
) -> np.ndarray:
    """Attention flow: ``F[b, i, j]`` is the maximum flow from output token ``i`` (top layer)
    to input token ``j`` in the layer graph whose edge ``(l, j) -> (l + 1, i)`` has capacity
    ``A_l[i, j]`` (:func:`layer_maps`). One max-flow per pair: meant for tens of tokens;
    ``tokens`` limits the output tokens computed (others are 0). Returns numpy ``[B, T, T]``.

    >>> import jax.numpy as jnp
    >>> eye = jnp.eye(3)[None, None]
    >>> flow([eye, eye])[0].round(6).tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    layers = [np.asarray(a) for a in layer_maps(maps, head_fusion=head_fusion, residual=residual)]
    B, T = layers[0].shape[:2]
    L = len(layers)
    n = (L + 1) * T
    out = np.zeros((B, T, T))
    rows = range(T) if tokens is None else tokens
    for b in range(B):
        cap = np.zeros((n, n))
        for l, a in enumerate(layers):  # node l*T + j (layer l, token j) -> (l+1)*T + i
            cap[l * T : (l + 1) * T, (l + 1) * T : (l + 2) * T] = a[b].T
        # flow runs from the top layer down: reverse the edges
        cap = cap.T
        for i in rows:
            for j in range(T):
                out[b, i, j] = max_flow(cap, L * T + i, j)
    return out
