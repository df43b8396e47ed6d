"""Capture what attention layers compute inside a model, without changing the model's code.

Letter legend: B batch, H query heads, K key/value heads, T queries, S keys (spatial positions
flattened in row-major order).

* :func:`attention_weights`: the weights ``[B, H, T, S]`` of *any* attention op, as the
  derivative of its output with respect to its values (exact for every op linear in ``v``,
  which is all of :mod:`attnjax.ops`): one call of the op itself with one-hot values, so
  masks, score mods, normalizers and routing are the op's own.
* :func:`capture`: a context manager that intercepts the attention calls of the chosen layers
  of a Flax NNX model (every :mod:`attnjax.nn` attention module, and any module with an
  ``attention_fn``, e.g. ``flax.nnx.MultiHeadAttention(attention_fn=nn.flax_attention_fn())``)
  and *sows* their weights (or blockwise statistics) as :class:`flax.nnx.Intermediate` state,
  so it works under ``nnx.jit``.
* :func:`attention_layers`: the attention modules of a model, in order, by path.

The interceptor is shared with :mod:`attnjax.analysis.importance` (head gates).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import nn, ops
from attnjax.analysis import stats as stats_lib

ATTENTION_OPS = (
    "attention",
    "sigmoid_attention",
    "agent_attention",
    "linear_attention",
    "lightning_attention",
    "block_attention",
    "grid_attention",
    "mega_attention",
    "moh_attention",
    "multi_token_attention",
    "selective_attention",
    "routing_attention",
    "neighborhood_attention",
    "moa_attention",
    "biformer_attention",
    "hyper_attention",
    "landmark_attention",
)
"""The :mod:`attnjax.ops` functions intercepted inside modules that call them by name."""

ATTENTION_MODULES = (
    nn.MultiHeadAttention,
    nnx.MultiHeadAttention,
    nn.AgentAttention,
    nn.MoHAttention,
    nn.RoutingAttention,
    nn.MegaLayer,
    nn.MultiTokenAttention,
    nn.SelectiveAttention,
    nn.MultiAxisAttention,
    nn.LinearGlobalAttention,
)
"""Module types treated as attention layers (besides any module holding an ``attention_fn``)."""

MARK = "attnjax_analysis"  # static attribute naming a marked layer (it survives nnx.split/merge)
WEIGHTS, STATS, GATE = "attnjax_weights", "attnjax_stats", "attnjax_gate"


class HeadGate(nnx.Variable):
    """Per-head multipliers ``xi_h`` of a layer's attention outputs (:mod:`attnjax.analysis.importance`)."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What to do at one marked layer (static, hashable: it lives in the model's graph)."""

    name: str
    weights: bool = False
    stats: stats_lib.StatsConfig | None = None
    heads: tuple[int, ...] | None = None
    gate: bool = False
    probe: bool = False


HEADS_SEEN: dict[str, int] = {}
"""Query heads of each layer called with ``LayerSpec(probe=True)`` (static shapes only)."""


# -- one-hot weights of any op -----------------------------------------------------------------


def _split_qkv(args, kwargs):
    args, kwargs = list(args), dict(kwargs)
    names = (("q", "query"), ("k", "key"), ("v", "value"))
    qkv = []
    for short, long in names:
        if args:
            qkv.append(args.pop(0))
        elif short in kwargs or long in kwargs:
            qkv.append(kwargs.pop(short if short in kwargs else long))
        else:
            raise TypeError(f"an attention op call needs {short} (positional or keyword)")
    return qkv, args, kwargs


def _output(out):
    if isinstance(out, ops.MoHOutput):
        return out.out
    return out[0] if isinstance(out, tuple) else out


def attention_weights(
    op: Callable[..., Any], q: Array, k: Array, v: Array | None = None, *args, **kwargs
) -> Float[Array, "B H T S"]:
    """The attention weights of ``op(q, k, v, *args, **kwargs)``: ``A[b, h, t, s] =
    d out[b, t, h, e] / d v[b, s, h // G, e]``, float32 ``[B, H, T, S]`` (spatial ops: positions
    flattened row-major; ``v`` only needs the layout, and may be omitted).

    Computed by one call of ``op`` with one-hot values ``v[b, s, k, e] = (s == e)`` (value dim
    ``S``), so it costs ``O(B H T S)`` memory: for long sequences use
    :func:`attnjax.analysis.blockwise_stats`. Exact for ops linear in ``v`` (all of
    :mod:`attnjax.ops`); for linear attention these are the implicit weights
    ``phi(q_t) phi(k_s) / normalizer``.

    >>> import jax
    >>> from attnjax import ops
    >>> q = k = jax.random.normal(jax.random.key(0), (1, 5, 2, 4))
    >>> w = attention_weights(ops.attention, q, k, is_causal=True)
    >>> w.shape, bool(abs(w.sum(-1) - 1).max() < 1e-5), float(w[0, 0, 0, 1])
    ((1, 2, 5, 5), True, 0.0)
    """
    if getattr(q, "ndim", 0) < 4 or getattr(k, "ndim", 0) != q.ndim:
        raise ValueError(
            f"q and k must have shape [B, *positions, heads, D] (same rank >= 4); got "
            f"{getattr(q, 'shape', q)} and {getattr(k, 'shape', k)}"
        )
    pos_k = k.shape[1:-2]
    S = 1
    for n in pos_k:
        S *= n
    B, Kh = k.shape[0], k.shape[-2]
    dtype = v.dtype if v is not None else q.dtype
    eye = jnp.eye(S, dtype=dtype).reshape(*pos_k, 1, S)
    onehot = jnp.broadcast_to(eye[None], (B, *pos_k, Kh, S))
    out = _output(op(q, k, onehot, *args, **kwargs))
    H = out.shape[-2]
    out = out.reshape(out.shape[0], -1, H, S).astype(jnp.float32)  # [B, T, H, S]
    return out.transpose(0, 2, 1, 3)


# -- the interceptor ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Frame:
    module: Any
    spec: LayerSpec
    records: list = dataclasses.field(default_factory=list)
    busy: bool = False


_STACK: list[_Frame] = []
_ACTIVE: list[bool] = []


def _handle(frame: _Frame, op, args, kwargs):
    spec = frame.spec
    out = op(*args, **kwargs)
    if spec.probe:
        HEADS_SEEN[spec.name] = int(_output(out).shape[-2])
    if spec.weights or spec.stats is not None:
        (q, k, v), rest, kw = _split_qkv(args, kwargs)
        if spec.stats is not None and "shard" in _params(op) and q.ndim == 4 and "shard" not in kw:
            extra = dict(kw)
            if rest:  # ops.attention's positional bias and mask
                for name, x in zip(("bias", "mask"), rest):
                    extra[name] = x
            extra = {
                n: x for n, x in extra.items() if n not in ("return_lse", "implementation") and x is not None
            }
            st = stats_lib.blockwise_stats(q, k, op=op, config=spec.stats, **extra)
            frame.records.append((STATS, _select(st, spec.heads)))
        else:
            kw.pop("return_lse", None)
            w = attention_weights(op, q, k, v, *rest, **kw)
            w = w if spec.heads is None else w[:, list(spec.heads)]
            if spec.weights:
                frame.records.append((WEIGHTS, w))
            if spec.stats is not None:
                frame.records.append((STATS, stats_lib.weight_stats(w, spec.stats)))
    if spec.gate:
        g = getattr(frame.module, GATE)[...]
        scale = lambda o: o * g.astype(o.dtype)[:, None]
        if isinstance(out, ops.MoHOutput):
            out = out._replace(out=scale(out.out))
        elif isinstance(out, tuple):
            out = (scale(out[0]), *out[1:])
        else:
            out = scale(out)
    return out


def _select(st: dict, heads):
    if heads is None:
        return st
    return {n: x[:, list(heads)] for n, x in st.items()}


def _params(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _wrap_op(op):
    @functools.wraps(op)
    def wrapped(*args, **kwargs):
        frame = _STACK[-1] if _STACK else None
        if frame is None or frame.busy:
            return op(*args, **kwargs)
        frame.busy = True  # ops that call other ops are recorded once
        try:
            return _handle(frame, op, args, kwargs)
        finally:
            frame.busy = False

    wrapped.attnjax_intercepted = op
    return wrapped


def _wrap_call(call):
    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        spec = getattr(self, MARK, None)
        if spec is None:
            return call(self, *args, **kwargs)
        frame = _Frame(self, spec)
        _STACK.append(frame)
        try:
            out = call(self, *args, **kwargs)
        finally:
            _STACK.pop()
        for name, value in frame.records:
            self.sow(nnx.Intermediate, name, value)
        return out

    __call__.attnjax_intercepted = call
    return __call__


def attention_layers(model) -> dict[str, Any]:
    """``{path: module}`` of the attention layers of ``model`` (instances of
    :data:`ATTENTION_MODULES` or modules with an ``attention_fn``), in graph order; a path is
    ``"blocks/0/attention"``. A layer inside another attention layer is not listed."""
    found: dict[str, Any] = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        if isinstance(node, ATTENTION_MODULES) or callable(getattr(node, "attention_fn", None)):
            name = "/".join(map(str, path))
            if not any(name.startswith(p + "/") for p in found):
                found[name] = node
    if (
        not found
        and isinstance(model, nnx.Module)
        and (isinstance(model, ATTENTION_MODULES) or callable(getattr(model, "attention_fn", None)))
    ):
        found[""] = model
    return found


def select_layers(model, layers=None) -> dict[str, Any]:
    """The attention layers chosen by ``layers``: None (all), or a sequence of indices into
    :func:`attention_layers` and/or paths."""
    every = attention_layers(model)
    if not every:
        raise ValueError(
            f"{type(model).__name__} has no attention layer (see attnjax.analysis.ATTENTION_MODULES)"
        )
    if layers is None:
        return every
    names = list(every)
    chosen = {}
    for x in layers:
        if isinstance(x, int):
            if not -len(names) <= x < len(names):
                raise ValueError(f"layer index {x} out of range: the model has {len(names)} attention layers")
            x = names[x]
        if x not in every:
            raise ValueError(f"no attention layer at {x!r}; the layers are {names}")
        chosen[x] = every[x]
    return chosen


@contextlib.contextmanager
def intercept(layers: dict[str, Any], specs: dict[str, LayerSpec]):
    """Marks ``layers`` with their :class:`LayerSpec` and routes their attention calls through the
    interceptor for the duration (patching the modules' classes and :mod:`attnjax.ops`); restores
    everything on exit. One interception at a time."""
    if _ACTIVE:
        raise RuntimeError(
            "an attnjax.analysis capture or head_gates context is already active (nest them never)"
        )
    _ACTIVE.append(True)
    patched_ops = {n: getattr(ops, n) for n in ATTENTION_OPS}
    classes = {type(m) for m in layers.values()}
    calls = {c: c.__dict__.get("__call__") for c in classes}
    fns = {}
    try:
        for n, f in patched_ops.items():
            setattr(ops, n, _wrap_op(f))
        for c in classes:
            c.__call__ = _wrap_call(c.__call__)
        for name, m in layers.items():
            setattr(m, MARK, specs[name])
            fn = getattr(m, "attention_fn", None)
            if callable(fn) and not isinstance(fn, nnx.Module):
                fns[name] = fn
                m.attention_fn = _wrap_op(fn)
        yield
    finally:
        for n, f in patched_ops.items():
            setattr(ops, n, f)
        for c, call in calls.items():
            if call is None:
                del c.__call__
            else:
                c.__call__ = call
        for name, m in layers.items():
            if name in fns:
                m.attention_fn = fns[name]
            if hasattr(m, MARK):
                delattr(m, MARK)
        _ACTIVE.pop()


class Capture:
    """What :func:`capture` collected: per layer path, one entry per model call.

    ``weights[name]`` is a list of ``[B, H, T, S]`` arrays, ``stats[name]`` a list of statistics
    dicts (:mod:`attnjax.analysis.stats`). Filled when the context exits (and by :meth:`collect`
    inside it, after a call)."""

    def __init__(self, layers: dict[str, Any]):
        self.layers = layers
        self.weights: dict[str, list] = {}
        self.stats: dict[str, list] = {}

    def collect(self) -> Capture:
        """Moves what the layers sowed so far into ``weights``/``stats`` (clearing it there)."""
        for name, m in self.layers.items():
            for attr, store in ((WEIGHTS, self.weights), (STATS, self.stats)):
                var = getattr(m, attr, None)
                if var is not None:
                    store.setdefault(name, []).extend(var.get_value())
                    delattr(m, attr)
        return self

    def last(self) -> dict[str, Any]:
        """``{name: weights of the last call}`` (or statistics, if no weights were captured)."""
        src = self.weights or self.stats
        return {n: v[-1] for n, v in src.items()}

    def stacked(self) -> list:
        """The last call's weights of every captured layer, in layer order (for rollout)."""
        return [self.weights[n][-1] for n in self.layers if n in self.weights]


@contextlib.contextmanager
def capture(
    model,
    layers: Sequence[int | str] | None = None,
    heads: Sequence[int] | None = None,
    *,
    weights: bool = True,
    stats: bool | stats_lib.StatsConfig = False,
):
    """Captures the attention of ``model``'s layers while the context is open.

    Every call of the model inside the context (eager, ``nnx.jit``, ``nnx.grad``...) sows, for
    each chosen layer, its weights ``[B, len(heads), T, S]`` (``weights=True``) and/or their
    statistics (``stats=True`` or a :class:`StatsConfig`; computed blockwise without a
    ``[T, S]`` array for :func:`attnjax.ops.attention`-family ops, from dense weights for the
    others). ``layers``: indices into :func:`attention_layers` or paths (default all);
    ``heads``: query heads to keep (default all).

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from attnjax import analysis, nn
    >>> mha = nn.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
    >>> with analysis.capture(mha) as cap:
    ...     y = nnx.jit(lambda m, x: m(x, is_causal=True))(mha, jnp.ones((1, 3, 8)))
    >>> w = cap.weights[""][0]
    >>> w.shape, float(w[0, 0, 0, 1])
    ((1, 2, 3, 3), 0.0)
    """
    if stats is True:
        stats = stats_lib.StatsConfig()
    if not weights and not stats:
        raise ValueError("capture: ask for weights=True and/or stats=")
    chosen = select_layers(model, layers)
    hs = None if heads is None else tuple(int(h) for h in heads)
    specs = {n: LayerSpec(n, weights=bool(weights), stats=stats or None, heads=hs) for n in chosen}
    cap = Capture(chosen)
    with intercept(chosen, specs):
        yield cap
        cap.collect()
