"""Matplotlib views of attention; every function returns a ``matplotlib.figure.Figure``
(matplotlib is imported when a view is drawn, never when attnjax is imported)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, cols: int):
    cols = max(1, min(cols, n))
    return -(-n // cols), cols


def heatmap(
    weights, *, mask=None, titles: Sequence[str] | None = None, cols: int = 4, labels=None, cmap="viridis"
):
    """Heatmaps of ``[T, S]``, ``[H, T, S]`` or ``[B, H, T, S]`` weights (first batch element),
    one panel per head; ``mask`` (boolean, broadcastable to ``[H, T, S]``, ``True`` = attend)
    hatches the masked entries; ``labels`` names the tokens on both axes."""
    w = np.asarray(weights, np.float32)
    if w.ndim == 4:
        w = w[0]
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3:
        raise ValueError(f"weights must be [T, S], [H, T, S] or [B, H, T, S]; got shape {np.shape(weights)}")
    H = w.shape[0]
    plt = _plt()
    rows, cols = _grid(H, cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
    m = None if mask is None else np.broadcast_to(np.asarray(mask, bool), w.shape)
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(w[h], cmap=cmap, vmin=0.0, interpolation="nearest")
        if m is not None:
            ax.imshow(
                np.where(m[h], np.nan, 1.0), cmap="Greys", alpha=0.35, vmin=0, vmax=1, interpolation="nearest"
            )
        ax.set_title(titles[h] if titles else f"head {h}", fontsize=8)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, fontsize=5, rotation=90)
            ax.set_yticks(range(len(labels)), labels, fontsize=5)
        else:
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def rollout_image(rollout_map, grid: tuple[int, int], *, image=None, token: int | None = None, skip: int = 0):
    """A rollout row over an image's patch grid: ``rollout_map`` ``[T, T]`` (or ``[B, T, T]``,
    first element), row ``token`` (default: the mean over rows), keys ``skip:`` reshaped to
    ``grid`` (e.g. ``skip=1`` drops a class token); drawn over ``image`` when given."""
    r = np.asarray(rollout_map, np.float32)
    r = r[0] if r.ndim == 3 else r
    if r.ndim != 2:
        raise ValueError(f"rollout_map must be [T, T] or [B, T, T]; got {np.shape(rollout_map)}")
    row = r.mean(0) if token is None else r[token]
    row = row[skip:]
    if row.size != grid[0] * grid[1]:
        raise ValueError(f"{row.size} keys do not fill a {grid} grid (use skip= for extra tokens)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3, 3))
    if image is not None:
        img = np.asarray(image)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=(0, grid[1], grid[0], 0))
        ax.imshow(row.reshape(grid), cmap="inferno", alpha=0.55, extent=(0, grid[1], grid[0], 0))
    else:
        ax.imshow(row.reshape(grid), cmap="inferno")
    ax.set_title("rollout" + ("" if token is None else f" of token {token}"), fontsize=9)
    ax.axis("off")
    return fig


def qk_embedding(q, k, *, method: str = "pca", head: int = 0, seed: int = 0):
    """Queries and keys of one head in one 2-D embedding (as AttentionViz): ``q [B, T, H, D]``,
    ``k [B, S, K, D]`` (the key head of query head ``head``); ``method`` ``"pca"`` or
    ``"tsne"`` (scikit-learn). Points are coloured by position."""
    q, k = np.asarray(q, np.float32), np.asarray(k, np.float32)
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be [B, T, H, D]; got {q.shape} and {k.shape}")
    G = q.shape[2] // k.shape[2]
    qs, ks = q[:, :, head].reshape(-1, q.shape[-1]), k[:, :, head // G].reshape(-1, k.shape[-1])
    x = np.concatenate([qs, ks])
    if method == "pca":
        x = x - x.mean(0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        y = x @ vt[:2].T
    elif method == "tsne":
        from sklearn.manifold import TSNE

        y = TSNE(2, perplexity=min(30.0, max(2.0, len(x) / 4)), random_state=seed, init="pca").fit_transform(
            x
        )
    else:
        raise ValueError(f"method must be 'pca' or 'tsne'; got {method!r}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 3.5))
    nq = len(qs)
    ax.scatter(
        y[:nq, 0],
        y[:nq, 1],
        c=np.tile(np.arange(q.shape[1]), q.shape[0]),
        cmap="Blues",
        s=10,
        label="queries",
    )
    ax.scatter(
        y[nq:, 0],
        y[nq:, 1],
        c=np.tile(np.arange(k.shape[1]), k.shape[0]),
        cmap="Oranges",
        s=10,
        marker="^",
        label="keys",
    )
    ax.legend(fontsize=7)
    ax.set_title(f"q/k embedding, head {head} ({method})", fontsize=9)
    return fig


def head_bars(scores: dict, *, title: str = "head importance", ylabel: str = "score"):
    """Bar chart of per-head scores ``{layer: [H]}`` (head importance, sink or detector scores),
    grouped by layer."""
    if not scores:
        raise ValueError("scores is empty")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(3.0, 0.35 * sum(len(v) for v in scores.values()) + 1), 2.8))
    x = 0
    ticks, names = [], []
    for i, (layer, vals) in enumerate(scores.items()):
        vals = np.asarray(vals, np.float32).reshape(-1)
        xs = np.arange(x, x + len(vals))
        ax.bar(xs, vals, color=f"C{i % 10}", label=layer or "layer")
        ticks += list(xs)
        names += [str(h) for h in range(len(vals))]
        x += len(vals) + 1
    ax.set_xticks(ticks, names, fontsize=6)
    ax.set_xlabel("head")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def pruning_plot(curve: dict, *, ylabel: str = "metric", label: str | None = None, ax=None):
    """The curve of :func:`attnjax.analysis.pruning_curve`: metric against the fraction of heads
    removed."""
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(4, 3))
    else:
        fig = ax.figure
    ax.plot(curve["fraction"], curve["metric"], marker="o", ms=3, label=label)
    ax.set_xlabel("fraction of heads removed (least important first)")
    ax.set_ylabel(ylabel)
    if label:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
