"""Logical axis names and the rules that map them to mesh axes.

Arrays in attnjax have logical axes: activations ``batch``, ``sequence``, ``heads`` (query
heads), ``kv_heads`` and ``head_dim``; parameters also ``embed`` (model features), ``mlp`` (an
MLP's hidden features) and ``vocab``. A training setup maps them to its mesh's axes with
*rules*, as in MaxText's logical axis rules: a mapping ``{logical name: mesh axis | tuple of
mesh axes | None}`` (or a sequence of ``(name, axes)`` pairs). Mesh axes that the mesh does not
have are ignored, so one set of rules serves a laptop (one device) and a pod.

Every :mod:`attnjax.nn` module names the logical axes of its parameters (``nnx.Param``
metadata ``out_sharding``, read by ``nnx.get_partition_spec``); :func:`param_shardings` turns a
model's state into ``NamedSharding`` s by these rules. With :data:`DEFAULT_RULES` that is FSDP
plus tensor parallelism: q/k/v projections split by heads, the output projection by its input
heads, MLPs by hidden features (all over ``tensor``), and the model-feature axis of every
parameter over ``fsdp``.

>>> from attnjax import parallel
>>> tuple(parallel.spec(("batch", "sequence", "heads", "head_dim")))
(('data', 'fsdp'), 'context', 'tensor', None)
>>> tuple(parallel.spec(("embed", "heads", "head_dim")))  # a query projection's kernel
('fsdp', 'tensor', None)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = ("batch", "sequence", "heads", "kv_heads", "head_dim", "embed", "mlp", "vocab")

DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "sequence": "context",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "vocab": None,
}
"""Batch over data and FSDP axes, sequence over the context axis, heads (and an MLP's hidden
features) over the tensor axis; parameters' model-feature axis over FSDP."""

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


def spec(names: Sequence[str | None], rules: Rules | None = None, mesh: Mesh | None = None,
         shape: Sequence[int] | None = None) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with logical axes ``names`` (``None``: replicated).

    A mesh axis shards at most one array axis (the first that asks for it: an activation
    ``("batch", "sequence", "embed")`` keeps ``fsdp`` on the batch). Given the array's ``shape``
    (and a ``mesh``), an axis whose size the mesh axes do not divide stays replicated, so a
    small parameter (a LayerNorm scale of odd width) never blocks a model from sharding."""
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical axes {tuple(names)} do not match an array of shape {tuple(shape)}")
    parts, used = [], set()
    for i, name in enumerate(names):
        axes = () if name is None else tuple(a for a in mesh_axes(name, rules, mesh) if a not in used)
        if axes and shape is not None and mesh is not None and shape[i] % axis_size(axes, mesh):
            axes = ()
        used.update(axes)
        parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*parts)


def sharding(mesh: Mesh, names: Sequence[str | None], rules: Rules | None = None) -> NamedSharding:
    """``NamedSharding(mesh, spec(names, rules, mesh))``."""
    return NamedSharding(mesh, spec(names, rules, mesh))


def param_shardings(tree, mesh: Mesh, rules: Rules | None = None):
    """``NamedSharding`` s for a model's state (an ``nnx.State``, or a pytree of ``nnx.Variable`` s).

    Each variable's logical axes are its ``out_sharding`` metadata (what the :mod:`attnjax.nn`
    modules set, or ``nnx.with_partitioning``); they map to mesh axes by ``rules`` (default
    :data:`DEFAULT_RULES`) through :func:`spec` with the variable's shape, so an axis the mesh
    does not divide stays replicated. Variables without metadata are replicated. The result has
    the structure of ``tree`` (``jax.device_put(state, param_shardings(state, mesh))``).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn, parallel
    >>> model = nn.MultiHeadAttention(4, 16, rngs=nnx.Rngs(0))
    >>> mesh = parallel.make_mesh({"fsdp": 1, "tensor": 1}, jax.devices()[:1])
    >>> shardings = parallel.param_shardings(nnx.state(model), mesh)
    >>> tuple(shardings.query.kernel.spec)
    ('fsdp', 'tensor', None)
    """
    from flax import nnx  # parameters are flax.nnx variables; attnjax.parallel needs flax only here

    def one(x):
        value = x.get_value() if isinstance(x, nnx.Variable) else x
        shape = getattr(value, "shape", None)
        names = x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None
        if shape is None:
            return NamedSharding(mesh, PartitionSpec())
        if not names:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, spec(tuple(names), rules, mesh, shape=shape))

    def leaf(x):
        out = one(x)
        return x.replace(out) if isinstance(x, nnx.Variable) else out

    return jax.tree.map(leaf, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
