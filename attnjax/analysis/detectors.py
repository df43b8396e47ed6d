"""Head and pattern detectors, each a score per head (``[..., H]``) from dense weights
``[B, H, T, S]`` or from their statistics (:mod:`attnjax.analysis.stats`, dense or blockwise).

* :func:`sinks`: keys that receive far more than ``1/N`` of the mass (Xiao et al., 2023), and
  :func:`massive_activations`: hidden features far above the median (Sun et al., 2024), the
  activations that usually come with sinks;
* :func:`offset_score` / :func:`previous_token_score`: mass at a fixed relative position;
* :func:`delimiter_score`: mass on delimiter tokens;
* :func:`copy_score`: retrieval/copy heads (Wu et al., 2024): the fraction of steps whose
  most-attended key holds the token being produced;
* :func:`waad`, :func:`fai`, :func:`entropy`: windowed attention distance, future attention
  influence (mean attention a token receives from later ones), row entropy, per head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from attnjax.analysis.stats import StatsConfig, weight_stats


def _stats(x, config: StatsConfig | None = None) -> dict:
    if isinstance(x, dict):
        return x
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected weights [B, H, T, S] or a stats dict; got shape {x.shape}")
    return weight_stats(x, config or StatsConfig())


def _row_mean(x, rows=None):
    """Mean over batch and the chosen query rows: ``[B, H, T] -> [H]``."""
    if rows is not None:
        x = x[:, :, rows]
    return jnp.mean(x, axis=(0, 2))


def entropy(w_or_stats, *, normalized: bool = False) -> Array:
    """Mean row entropy per head ``[H]`` (nats; ``normalized``: divided by ``log S``)."""
    st = _stats(w_or_stats)
    h = _row_mean(st["entropy"])
    return h / jnp.log(max(st["received"].shape[-1], 2)) if normalized else h


def offset_score(w_or_stats, offset: int, *, config: StatsConfig | None = None) -> Array:
    """Mean weight at relative position ``offset`` (``A[t, pos_t - offset]``) per head, over the
    queries that have such a key."""
    cfg = config or StatsConfig(num_offsets=max(8, offset + 1))
    st = _stats(w_or_stats, cfg)
    if offset >= st["offsets"].shape[-1]:
        raise ValueError(f"offset {offset} is beyond the {st['offsets'].shape[-1]} offsets of these stats")
    T, S = st["offsets"].shape[2], st["received"].shape[-1]
    q_off = S - T if cfg.q_offset is None else cfg.q_offset
    rows = np.nonzero(np.arange(T) + q_off - offset >= 0)[0]
    return _row_mean(st["offsets"][..., offset], rows)


def previous_token_score(w_or_stats, **kw) -> Array:
    """:func:`offset_score` at offset 1: the mean weight each query puts on the token before it."""
    return offset_score(w_or_stats, 1, **kw)


def offset_heads(w_or_stats, *, threshold: float = 0.5, max_offset: int = 8) -> list[tuple[int, int, float]]:
    """``(head, offset, score)`` for each head whose mean weight at one offset exceeds
    ``threshold`` (its best offset)."""
    st = _stats(w_or_stats, StatsConfig(num_offsets=max_offset))
    scores = jnp.stack(
        [offset_score(st, o, config=StatsConfig(num_offsets=max_offset)) for o in range(max_offset)], -1
    )
    best = np.asarray(jnp.argmax(scores, -1))
    return [
        (h, int(best[h]), float(scores[h, best[h]]))
        for h in range(scores.shape[0])
        if scores[h, best[h]] > threshold
    ]


def waad(w_or_stats) -> Array:
    """Windowed average attention distance per head: ``mean_t sum_s A min(|t - s|, W)``."""
    return _row_mean(_stats(w_or_stats)["waad"])


def fai(w_or_stats) -> Array:
    """Future attention influence per key, ``[B, H, S]``: the mean attention each token receives
    from the tokens after it."""
    return _stats(w_or_stats)["fai"]


@dataclasses.dataclass
class SinkReport:
    """Keys receiving ``ratio`` times more than uniform (``1/N``, ``N`` the keys a query sees on
    average) in each head: ``score [H, S]`` is the mean weight a key receives per query, times
    ``N``; ``sinks[h]`` lists the keys above the ratio."""

    score: np.ndarray
    sinks: list[list[int]]

    def heads(self) -> list[int]:
        return [h for h, s in enumerate(self.sinks) if s]


def sinks(w_or_stats, *, ratio: float = 5.0, causal: bool = False) -> SinkReport:
    """Attention sinks per head: keys whose mean received weight is ``> ratio / N``.

    ``causal``: key ``s`` is seen only by the queries at or after it (``T - s`` of them, for
    self-attention); its mean is taken over those, and ``N`` is the mean number of keys a query
    sees (``(T + 1) / 2``)."""
    st = _stats(w_or_stats)
    rec = np.asarray(jnp.mean(st["received"], 0))  # [H, S]
    T, S = st["entropy"].shape[-1], rec.shape[-1]
    if causal:
        seen_by = np.maximum(T - np.maximum(np.arange(S) - (S - T), 0), 1)
        n = (np.arange(T) + (S - T) + 1).mean()
    else:
        seen_by, n = np.full(S, T), S
    score = rec / seen_by * n
    return SinkReport(score, [list(map(int, np.nonzero(score[h] > ratio)[0])) for h in range(rec.shape[0])])


def massive_activations(hidden, *, ratio: float = 100.0, min_value: float = 1.0):
    """Positions and features of massive activations in hidden states ``[B, T, C]``: ``|x|``
    above ``ratio`` times the median ``|x|`` and above ``min_value`` (Sun et al. use 100 and
    1000x). Returns ``(mask [B, T], top [B, T])``: which tokens hold one, and each token's
    largest ``|x| / median``."""
    x = jnp.abs(jnp.asarray(hidden, jnp.float32))
    if x.ndim != 3:
        raise ValueError(f"hidden must have shape [B, T, C]; got {x.shape}")
    med = jnp.median(x)
    top = x.max(-1) / jnp.maximum(med, 1e-12)
    return (top > ratio) & (x.max(-1) > min_value), top


def delimiter_score(weights, tokens, delimiters: Sequence[int]) -> Array:
    """Mean mass per head that queries put on keys holding one of ``delimiters``; ``weights``
    dense ``[B, H, T, S]``, ``tokens`` ``[B, S]``."""
    w = jnp.asarray(weights, jnp.float32)
    tokens = jnp.asarray(tokens)
    if w.ndim != 4 or tokens.shape != (w.shape[0], w.shape[-1]):
        raise ValueError(f"weights must be [B, H, T, S] and tokens [B, S]; got {w.shape} and {tokens.shape}")
    is_delim = jnp.isin(tokens, jnp.asarray(list(delimiters)))
    return jnp.mean(jnp.where(is_delim[:, None, None, :], w, 0.0).sum(-1), axis=(0, 2))


def copy_score(w_or_stats, tokens, targets=None) -> Array:
    """Retrieval/copy score per head: among the steps whose target token occurs earlier in the
    context, the fraction whose most-attended key holds that token. ``tokens`` ``[B, S]`` are
    the keys' tokens; ``targets`` ``[B, T]`` the tokens produced at each query (default: the next
    token, ``tokens[:, 1:]`` for a language model, the last query having none)."""
    st = _stats(w_or_stats)
    arg = jnp.asarray(st["argmax"])  # [B, H, T]
    tokens = jnp.asarray(tokens)
    B, H, T = arg.shape
    if tokens.shape[0] != B or tokens.shape[1] != st["received"].shape[-1]:
        raise ValueError(f"tokens must be [B, S] = {[B, st['received'].shape[-1]]}; got {tokens.shape}")
    if targets is None:
        targets = jnp.concatenate(
            [tokens[:, 1 : T + 1], jnp.full((B, max(T + 1 - tokens.shape[1], 0)), -1)], 1
        )[:, :T]
    targets = jnp.asarray(targets)
    attended = jnp.take_along_axis(tokens[:, None, :], arg, axis=-1)  # [B, H, T]
    S = tokens.shape[1]
    q_pos = jnp.arange(T) + (S - T)
    earlier = (tokens[:, None, :] == targets[:, :, None]) & (
        jnp.arange(S)[None, None, :] <= q_pos[None, :, None]
    )
    eligible = earlier.any(-1)  # [B, T]
    hit = (attended == targets[:, None, :]) & eligible[:, None, :]
    return hit.sum((0, 2)) / jnp.maximum(eligible.sum(), 1)
