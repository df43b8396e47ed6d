"""Head importance (Michel et al., 2019, "Are Sixteen Heads Really Better than One?") and
masking-based pruning curves, for any Flax NNX model built from attention layers
(:func:`attnjax.analysis.attention_layers`).

Each layer's attention output ``[B, T, H, E]`` is multiplied by a gate ``xi [H]``
(:class:`attnjax.analysis.HeadGate`, all ones: the model is unchanged) by the interceptor of
:mod:`attnjax.analysis.capture`; a head's importance is ``E_x |dL/dxi_h|``, and setting
``xi_h = 0`` removes the head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.analysis.capture import GATE, HEADS_SEEN, HeadGate, LayerSpec, intercept, select_layers


def _probe_heads(model, layers, probe) -> dict[str, int]:
    """Query heads of each layer, from the shapes of its attention output under ``probe``."""
    HEADS_SEEN.clear()
    specs = {n: LayerSpec(n, probe=True) for n in layers}
    with intercept(layers, specs):
        nnx.eval_shape(lambda m: probe(m), model)
    seen = dict(HEADS_SEEN)
    missing = [n for n in layers if n not in seen]
    if missing:
        raise ValueError(f"probe never called the attention of layers {missing}")
    return seen


@contextlib.contextmanager
def head_gates(model, probe: Callable, layers: Sequence[int | str] | None = None):
    """Gives each chosen attention layer a :class:`HeadGate` ``[H]`` of ones (attribute
    ``attnjax_gate``) that multiplies its heads' outputs while the context is open; yields
    ``{layer path: module}``. ``probe(model)`` is run abstractly once to learn each layer's
    number of heads (e.g. ``lambda m: loss_fn(m, batch)``).

    Read and write gates with ``module.attnjax_gate[...]``; differentiate with
    ``nnx.grad(f, argnums=nnx.DiffState(0, HeadGate))``."""
    chosen = select_layers(model, layers)
    heads = _probe_heads(model, chosen, probe)
    for n, m in chosen.items():
        setattr(m, GATE, HeadGate(jnp.ones((heads[n],), jnp.float32)))
    specs = {n: LayerSpec(n, gate=True) for n in chosen}
    try:
        with intercept(chosen, specs):
            yield chosen
    finally:
        for m in chosen.values():
            if hasattr(m, GATE):
                delattr(m, GATE)


def head_importance(
    model,
    loss_fn: Callable,
    batches: Iterable,
    layers: Sequence[int | str] | None = None,
    *,
    normalize: bool = True,
) -> dict[str, np.ndarray]:
    """Michel et al.'s importance ``I_h = E_x |dL(x)/dxi_h|`` of every head, ``{layer: [H]}``,
    averaged over ``batches`` (``loss_fn(model, batch) -> scalar``). ``normalize``: divide each
    layer's scores by their l2 norm, as the paper does before comparing layers."""
    batches = list(batches)
    if not batches:
        raise ValueError("head_importance needs at least one batch")
    with head_gates(model, lambda m: loss_fn(m, batches[0]), layers) as chosen:
        grad = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, HeadGate)))
        total = {n: 0.0 for n in chosen}
        for batch in batches:
            g = grad(model, batch)
            flat = dict(nnx.to_flat_state(g))
            for n in chosen:
                key = tuple(_path(n)) + (GATE,)
                total[n] = total[n] + jnp.abs(_value(flat[key]))
    out = {}
    for n, t in total.items():
        x = np.asarray(t) / len(batches)
        if normalize:
            x = x / max(float(np.linalg.norm(x)), 1e-12)
        out[n] = x
    return out


def _path(name: str):
    return [int(p) if p.isdigit() else p for p in name.split("/")] if name else []


def _value(v):
    return v.get_value() if hasattr(v, "get_value") else v


def pruning_curve(
    model,
    metric_fn: Callable,
    importance: dict[str, np.ndarray],
    *,
    steps: int | None = None,
    probe: Callable | None = None,
) -> dict:
    """Removes heads one at a time, least important first (ties broken by layer order), and
    evaluates ``metric_fn(model)`` after each removal. Returns ``{"removed": [0, 1, ...],
    "fraction": [...], "metric": [...], "order": [(layer, head), ...]}`` (index 0: nothing
    removed). ``steps`` limits the removals (default all heads); ``probe`` defaults to
    ``metric_fn``. The model is unchanged afterwards."""
    order = sorted(
        ((float(s), li, n, h) for li, (n, sc) in enumerate(importance.items()) for h, s in enumerate(sc))
    )
    order = [(n, h) for _, _, n, h in order]
    total = len(order)
    steps = total if steps is None else min(int(steps), total)
    metric = []
    with head_gates(model, probe or metric_fn, list(importance)) as chosen:
        for n, m in chosen.items():
            if getattr(m, GATE).shape[0] != len(importance[n]):
                raise ValueError(
                    f"importance[{n!r}] has {len(importance[n])} heads; the layer has {getattr(m, GATE).shape[0]}"
                )
        metric.append(float(metric_fn(model)))
        for n, h in order[:steps]:
            g = getattr(chosen[n], GATE)
            g[...] = g[...].at[h].set(0.0)
            metric.append(float(metric_fn(model)))
    removed = list(range(steps + 1))
    return dict(removed=removed, fraction=[r / total for r in removed], metric=metric, order=order[:steps])
