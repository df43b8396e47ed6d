"""Logical axis names and the rules that map them to mesh axes.

Arrays in attnjax have logical axes: ``batch``, ``sequence``, ``heads`` (query heads),
``kv_heads`` and ``head_dim``. A training setup maps them to its mesh's axes with *rules*, as
in MaxText's logical axis rules: a mapping ``{logical name: mesh axis | tuple of mesh axes |
None}`` (or a sequence of ``(name, axes)`` pairs). Mesh axes that the mesh does not have are
ignored, so one set of rules serves a laptop (one device) and a pod.

>>> from attnjax import parallel
>>> tuple(parallel.spec(("batch", "sequence", "heads", "head_dim")))
(('data', 'fsdp'), 'context', 'tensor', None)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = ("batch", "sequence", "heads", "kv_heads", "head_dim")

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "sequence": "context",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
}
"""Batch over data and FSDP axes, sequence over the context axis, heads over the tensor axis."""

Rules = Mapping[str, str | tuple[str, ...] | None] | Sequence[tuple[str, str | tuple[str, ...] | None]]


def as_rules(rules: Rules | None) -> dict[str, tuple[str, ...]]:
    """Normalizes rules to ``{logical name: tuple of mesh axes}`` (every logical axis present)."""
    if rules is None:
        rules = DEFAULT_RULES
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = {name: () for name in LOGICAL_AXES}
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"rules must map logical axis names to mesh axes; got entry {item!r}")
        name, axes = item
        if not isinstance(name, str):
            raise TypeError(f"a rule's logical axis must be a name (a string, one of {LOGICAL_AXES}); got {name!r}")
        if name not in out:
            raise ValueError(f"unknown logical axis {name!r}; expected one of {LOGICAL_AXES}")
        mesh = () if axes is None else (axes,) if isinstance(axes, str) else axes
        if not isinstance(mesh, (tuple, list)) or not all(isinstance(a, str) for a in mesh):
            raise TypeError(f"rule for {name!r} must be a mesh axis name, a sequence of them, or None "
                            f"(strings); got {axes!r}")
        out[name] = tuple(mesh)
    return out


def mesh_axes(name: str, rules: Rules | None = None, mesh: Mesh | None = None) -> tuple[str, ...]:
    """The mesh axes that logical axis ``name`` maps to (those the mesh has, if given)."""
    axes = as_rules(rules)[name]
    if mesh is not None:
        axes = tuple(a for a in axes if a in mesh.shape)
    return axes


def axis_size(axes: Sequence[str], mesh: Mesh) -> int:
    """The number of devices along ``axes``."""
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


def spec(names: Sequence[str | None], rules: Rules | None = None, mesh: Mesh | None = None) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with logical axes ``names`` (``None``: replicated)."""
    parts = []
    for name in names:
        axes = () if name is None else mesh_axes(name, rules, mesh)
        parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*parts)


def sharding(mesh: Mesh, names: Sequence[str | None], rules: Rules | None = None) -> NamedSharding:
    """``NamedSharding(mesh, spec(names, rules, mesh))``."""
    return NamedSharding(mesh, spec(names, rules, mesh))


def make_mesh(shape: Mapping[str, int], devices=None) -> Mesh:
    """A mesh with named axes (``{"data": 2, "context": 4}``), checked against the devices.

    Axes are ``Auto`` (sharding propagated by XLA outside ``shard_map``), as attnjax's wrappers
    expect.
    """
    devices = jax.devices() if devices is None else devices
    names, sizes = tuple(shape), tuple(int(n) for n in shape.values())
    total = 1
    for n in sizes:
        if n < 1:
            raise ValueError(f"mesh axis sizes must be >= 1; got {dict(shape)}")
        total *= n
    if total != len(devices):
        raise ValueError(f"mesh {dict(shape)} needs {total} devices; there are {len(devices)}")
    return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names), devices=devices)
