"""Frozen dataclasses registered as pytrees: the form of every mask, score mod, normalizer,
dropout and shard in attnjax, so their arrays can be traced, sharded and differentiated."""

from __future__ import annotations

import dataclasses

import jax


def pytree_dataclass(data: tuple[str, ...] = (), meta: tuple[str, ...] = ()):
    """Registers a frozen dataclass as a pytree: ``data`` fields are leaves, ``meta`` static.

    >>> import jax.numpy as jnp
    >>> @pytree_dataclass(data=("x",), meta=("n",))
    ... class Box:
    ...     x: object
    ...     n: int
    >>> jax.tree.leaves(Box(jnp.ones(2), 3))
    [Array([1., 1.], dtype=float32)]
    """

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))

    return wrap
