"""Sharding attnjax ops over a device mesh: logical axis rules, ``shard_map`` wrappers and
context parallelism (ring attention, all-to-all, halo exchange, recurrent-state passing).

See docs/parallel.md for choosing a scheme per op and the communication each one costs.
"""

from attnjax.parallel.api import shard_op
from attnjax.parallel.halo import halo_neighborhood_attention
from attnjax.parallel.recurrent import lightning_context_parallel, linear_context_parallel
from attnjax.parallel.ring import merge, ring_attention, unzigzag, zigzag
from attnjax.parallel.ulysses import ulysses_attention
from attnjax.parallel.rules import (
    DEFAULT_RULES, LOGICAL_AXES, as_rules, axis_size, make_mesh, mesh_axes, param_shardings, sharding, spec,
)

__all__ = [
    "DEFAULT_RULES", "LOGICAL_AXES", "as_rules", "axis_size", "make_mesh", "mesh_axes", "param_shardings",
    "sharding", "spec",
    "shard_op", "ring_attention", "merge", "zigzag", "unzigzag", "ulysses_attention",
    "halo_neighborhood_attention", "lightning_context_parallel", "linear_context_parallel",
]
