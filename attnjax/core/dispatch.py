"""Choosing an implementation: one place for every op.

``implementation`` is ``None``, a name (``"reference"``, ``"xla"``, ``"pallas"``) or a sequence of
names tried in order. An implementation that cannot serve a call raises ``NotImplementedError``
and the next one is tried; ``None`` means the platform's preferred order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax

from attnjax.core import platform

NAMES = ("reference", "xla", "pallas", "cudnn")

Implementation = str | Sequence[str] | None
"""The type of every op's ``implementation`` argument."""


def default_order(cpu_order: tuple[str, ...] | None = None) -> tuple[str, ...]:
    # Pallas kernels compile for GPU/TPU; on CPU they only run in (slow) interpret mode.
    if platform.current() == "gpu":  # cuDNN where an op has it (plain softmax attention), then Pallas
        return ("cudnn", "pallas", "xla", "reference")
    if platform.current() == "tpu":
        return ("pallas", "xla", "reference")
    return cpu_order or ("xla", "reference")


def candidates(implementation: str | Sequence[str] | None, cpu_order=None) -> tuple[str, ...]:
    if implementation is None:
        return default_order(cpu_order)
    names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
    for name in names:
        if name not in NAMES:
            raise ValueError(f"implementation must be None, one of {NAMES} or a sequence of them; got {name!r}")
    if not names:
        raise ValueError("implementation must not be an empty sequence")
    return names


def run(op: str, impls: Mapping[str, Callable[[], object]], implementation, cpu_order=None):
    """Calls the first implementation of ``op`` (a zero-argument closure) that serves the call.

    ``cpu_order`` overrides the default order on CPU for an op whose measurements say so."""
    reasons = []
    for name in candidates(implementation, cpu_order):
        fn = impls.get(name)
        if fn is None:
            reasons.append(f"{name}: {op} has no {name} implementation")
            continue
        try:
            return fn()
        except NotImplementedError as e:
            reasons.append(f"{name}: {e}")
    raise NotImplementedError(f"no implementation of {op} could serve this call ({'; '.join(reasons)})")


@dataclasses.dataclass(frozen=True)
class Autodiff:
    """How the arguments of a call are being differentiated (see :func:`autodiff`)."""

    forward: bool  # some forward-mode transformation (jax.jvp, jax.jacfwd, jax.hessian)
    reverse_order: int  # nested reverse-mode transformations (jax.grad of jax.grad: 2)


def autodiff(*trees) -> Autodiff:
    """Which autodiff transformations trace the arrays of ``trees``, so that an implementation
    built on ``jax.custom_vjp`` can decline (``NotImplementedError``, and dispatch tries the next
    one) what its custom rule cannot serve instead of failing later inside JAX: forward mode, or
    reverse mode of an order its backward is not differentiable to.

    JAX has no public way to ask; this walks the tracers' ``primal`` chain (``JVPTracer`` is forward
    mode, ``LinearizeTracer`` reverse mode since JAX's direct linearization). Best effort: a
    transformation applied outside a ``jit`` that contains the call is not seen (JAX then raises
    its own error), and on a JAX without these classes nothing is detected."""
    try:
        from jax._src.interpreters import ad
    except ImportError:  # pragma: no cover - a JAX without the module: detect nothing
        return Autodiff(False, 0)
    jvp, linearize = getattr(ad, "JVPTracer", ()), getattr(ad, "LinearizeTracer", ())
    forward, order = False, 0
    for x in jax.tree.leaves(trees):
        depth = 0
        while isinstance(x, jax.core.Tracer):
            forward |= bool(jvp) and isinstance(x, jvp)
            depth += bool(linearize) and isinstance(x, linearize)
            x = getattr(x, "primal", getattr(x, "val", None))
        order = max(order, depth)
    return Autodiff(forward, order)
