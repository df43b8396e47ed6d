r"""Partial attentions over disjoint key sets and their exact reweighting (zoo primitive C5), and
attention-sink calibration / redistribution (ACT, VAR) on top of it.

Softmax attention over a union of disjoint key sets ``P_1, ..., P_m`` is a convex combination of
the attentions over each set: with ``(O_p, lse_p)`` from ``ops.attention(..., return_lse=True)``
under the set's mask, ``lse = logsumexp_p lse_p`` and ``w_p = exp(lse_p - lse)`` (the attention
mass on ``P_p``, summing to 1), ``O = sum_p w_p O_p``. Any *post-softmax edit that moves mass
between sets and keeps the shape inside each set* is then exact and blockwise: ``O = sum_p a_p
O_p`` with new masses ``a_p`` computed from the ``w_p`` (:func:`reweight`), without the ``[T, S]``
weights ever existing.

ACT ("Unveiling and Harnessing Hidden Attention Sinks", Yu et al., ICML 2024): in calibrated heads
the weights on sink keys ``Sigma`` are scaled by ``beta`` and the freed mass ``(1 - beta) A(Sigma)``
goes to the other keys in proportion to their weights. VAR ("See What You Are Told: Visual
Attention Sink in Large Multimodal Models", Kang et al., ICLR 2025) moves a fraction ``p`` of the
mass on sink visual tokens to the *non-sink visual tokens* (``beta = 1 - p``, receivers = those
tokens), in image-centric heads only. Both are :func:`redistribute`:

.. math::

    O = \beta\, w_S O_S + \big(w_R + (1 - \beta) w_S\big) O_R + w_X O_X

over sinks ``S``, receivers ``R`` and the remaining keys ``X`` (empty when the receivers are all
non-sink keys, ACT). Which keys are sinks (ACT: ``A_ij > alpha / N`` beyond the first token; VAR:
massive activations in fixed hidden dimensions) is decided by the caller, as a mask.

Letter legend: B batch, T queries, S keys, H heads, K key/value heads, D head dim, E value dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax.core import dispatch, tiling
from attnjax.core.dispatch import Implementation
from attnjax.masks import Mask
from attnjax.ops.attention.api import attention

Part = tuple[Float[Array, "B T H E"], Float[Array, "B T H"]]


def partial_attentions(q, k, v, parts: Sequence[Mask], *, mask: Mask | None = None, **kwargs) -> list[Part]:
    """``[(out_p, lse_p)]``: ``ops.attention`` restricted to each key set ``parts[p] & mask``.

    The parts should be disjoint (where they overlap, a key is counted in each). ``kwargs`` go to
    :func:`attnjax.ops.attention` (``scale``, ``bias``, ``score_mod``, ``implementation``, ...);
    the normalizer must be softmax. Outputs are float32.
    """
    if not parts:
        raise ValueError("parts must list at least one key set (mask)")
    out = []
    for i, part in enumerate(parts):
        if not isinstance(part, Mask):
            raise TypeError(f"parts[{i}] must be an attnjax.masks mask; got {type(part).__name__}")
        m = part if mask is None else part & mask
        o, lse = attention(q, k, v, mask=m, return_lse=True, **kwargs)
        out.append((o.astype(jnp.float32), lse))
    return out


def part_weights(parts: Sequence[Part]) -> tuple[Float[Array, "P B T H"], Float[Array, "B T H"]]:
    """``(w [P, B, T, H], lse [B, T, H])``: the softmax mass on each part (summing to 1 over parts,
    all zero for a row that sees no key) and the log-sum-exp of the union."""
    lses = jnp.stack([lse for _, lse in parts])
    top = jax.lax.stop_gradient(lses.max(0))
    top = jnp.where(jnp.isneginf(top), 0.0, top)
    ws = jnp.exp(lses - top)
    total = ws.sum(0)
    safe = jnp.where(total == 0, 1.0, total)
    return ws / safe, jnp.where(total == 0, -jnp.inf, top + jnp.log(safe))


def reweight(parts: Sequence[Part], masses: Sequence[Float[Array, "#B #T #H"]]) -> Float[Array, "B T H E"]:
    """``sum_p masses[p] O_p``: the parts with new masses (from :func:`part_weights`'s ``w``);
    masses summing to 1 per row keep the result a convex combination."""
    if len(masses) != len(parts):
        raise ValueError(f"masses has {len(masses)} entries; expected one per part ({len(parts)})")
    return sum(jnp.asarray(a, jnp.float32)[..., None] * o for a, (o, _) in zip(masses, parts))


def merge_partials(parts: Sequence[Part]) -> Part:
    """The exact attention over the union of disjoint parts: ``(out, lse)`` (log-sum-exp merge)."""
    return tiling.merge(list(parts))


def redistribute(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    sinks: Mask,
    beta: float | Float[Array, "#B #T #H"],
    *,
    receivers: Mask | None = None,
    mask: Mask | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    """Attention with the mass on ``sinks`` scaled by ``beta`` and the freed mass given to
    ``receivers`` in proportion to their weights (ACT / VAR; module docstring).

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, S, K, D]``, ``[B, S, K, E]``.
      sinks: the sink keys, an attnjax mask (per query and head if it likes).
      beta: the kept fraction of sink mass, scalar or broadcastable to ``[B, T, H]`` (per head:
        shape ``[H]``; ``1`` in heads that are not calibrated); gets gradients.
      receivers: the keys that receive the freed mass (default: every non-sink key, ACT); taken
        outside the sinks.
      mask: the attention's own mask (``masks.causal()``, ...), applied to every part.
      scale: logit scale, default ``1 / sqrt(D)``.
      implementation: ``"reference"`` (dense weights edited after the softmax) or ``"xla"``
        (three partial attentions, blockwise, reweighted). None tries xla first.

    A row whose receivers see no key keeps its sink mass (nothing to give it to).

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops, masks
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 16, 2, 8))
    >>> sink = masks.from_fn(lambda b, h, i, j: j == 0)  # the first token
    >>> out = ops.redistribute(q, k, v, sink, 0.5, mask=masks.causal())
    >>> ref = ops.redistribute(q, k, v, sink, 0.5, mask=masks.causal(), implementation="reference")
    >>> bool(jnp.allclose(out, ref, atol=1e-5))
    True
    """
    if not isinstance(sinks, Mask) or (receivers is not None and not isinstance(receivers, Mask)):
        raise TypeError("sinks and receivers must be attnjax.masks masks")
    beta = jnp.asarray(beta, jnp.float32)
    if beta.ndim == 1:
        if beta.shape[0] != q.shape[2]:
            raise ValueError(
                f"beta of shape {beta.shape} must be a scalar, per head [H={q.shape[2]}] or [B, T, H]"
            )
        beta = beta[None, None, :]
    rest = ~sinks if receivers is None else receivers & ~sinks
    sets = [sinks, rest] + ([] if receivers is None else [~sinks & ~receivers])
    impls = {
        "reference": lambda: _reference(q, k, v, sets, beta, mask, scale),
        "xla": lambda: _partials(q, k, v, sets, beta, mask, scale),
    }
    return dispatch.run("redistribute", impls, implementation).astype(q.dtype)


def _masses(w, beta):
    w_s, w_r = w[0], w[1]
    give = jnp.where(w_r > 0, (1.0 - beta) * w_s, 0.0)  # no receiver: the sink mass stays
    return [w_s - give, w_r + give] + list(w[2:])


def _partials(q, k, v, sets, beta, mask, scale):
    parts = partial_attentions(q, k, v, sets, mask=mask, scale=scale, implementation="xla")
    w, _ = part_weights(parts)
    return reweight(parts, _masses(w, beta))


def _reference(q, k, v, sets, beta, mask, scale):
    """Dense: the weights ``A [B, H, T, S]`` (``ops.attention`` on identity values), edited per
    row, then ``A' V``."""
    B, T, H, _ = q.shape
    S, K = k.shape[1], k.shape[2]
    eye = jnp.broadcast_to(jnp.eye(S, dtype=jnp.float32)[None, :, None, :], (B, S, K, S))
    f32 = lambda x: x.astype(jnp.float32)
    A = attention(f32(q), f32(k), eye, mask=mask, scale=scale, implementation="reference").transpose(
        0, 2, 1, 3
    )
    member = [jnp.broadcast_to(m.materialize(T, S, batch=B, heads=H), (B, H, T, S)) for m in sets]
    w = [jnp.where(m, A, 0.0).sum(-1).transpose(0, 2, 1) for m in member]  # [B, T, H] each
    masses = _masses(jnp.stack(w), beta)
    ratio = [
        jnp.where(wp > 0, ap / jnp.where(wp > 0, wp, 1.0), 0.0).transpose(0, 2, 1)[..., None]
        for ap, wp in zip(masses, w)
    ]
    A = sum(jnp.where(m, A * r, 0.0) for m, r in zip(member, ratio))
    return tiling.weighted_values(A, f32(v)).transpose(0, 2, 1, 3)
