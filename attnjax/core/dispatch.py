"""Choosing an implementation: one place for every op.

``implementation`` is ``None``, a name (``"reference"``, ``"xla"``, ``"pallas"``) or a sequence of
names tried in order. An implementation that cannot serve a call raises ``NotImplementedError``
and the next one is tried; ``None`` means the platform's preferred order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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
