"""Input validation at the API edge.

Every public function checks its arguments here before any tracing-heavy work, so that a bad
shape is reported as ``ValueError``/``TypeError`` naming the argument, the shape it got and the
shape it expected, instead of an XLA error three frames deep or a silently broadcast result.
"""

from __future__ import annotations

import operator
from typing import Any

import jax.numpy as jnp
import numpy as np


def shape_str(names: tuple[str, ...]) -> str:
    return "[" + ", ".join(names) + "]"


def check_rank(name: str, x: Any, names: tuple[str, ...]) -> tuple[int, ...]:
    """Checks that ``x`` is an array of rank ``len(names)``; returns its shape."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{name} must be an array of shape {shape_str(names)}; got {type(x).__name__}")
    if len(shape) != len(names):
        raise ValueError(
            f"{name} must have rank {len(names)} with shape {shape_str(names)}; got shape {tuple(shape)}"
        )
    return tuple(shape)


def check_float(name: str, x: Any) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {x.dtype}")


def check_int_array(name: str, x: Any) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array; got dtype {x.dtype}")


def check_dim(name: str, shape: tuple[int, ...], axis: int, expected: int, what: str) -> None:
    if shape[axis] != expected:
        raise ValueError(
            f"{name} has shape {shape}; its axis {axis} ({what}) must be {expected}, got {shape[axis]}"
        )


def positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """Returns ``value`` as a Python int, or raises if it is not a (positive) integer."""
    try:
        ivalue = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer; got {value!r}") from None
    if ivalue < 0 or (ivalue == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {bound}; got {ivalue}")
    return ivalue


def broadcastable_to(name: str, x: Any, target: tuple[int, ...], names: tuple[str, ...]) -> None:
    """Checks that every axis of ``x`` is 1 or equal to ``target`` (same rank)."""
    shape = check_rank(name, x, names)
    for size, full in zip(shape, target):
        if size not in (1, full):
            expected = shape_str(tuple(f"{n}={t} or 1" for n, t in zip(names, target)))
            raise ValueError(f"{name} has shape {shape}; expected a shape broadcastable to {expected}")


def per_head(name: str, x: Any, heads: int | None) -> None:
    """Checks a per-head parameter: a scalar or a vector of length ``heads``."""
    shape = np.shape(x)
    if shape == ():
        return
    if len(shape) != 1 or (heads is not None and shape[0] != heads):
        raise ValueError(f"{name} must be a scalar or have shape [heads={heads}]; got shape {shape}")


def check_qkv(
    q: Any, k: Any, v: Any, *, same_length: bool = False, names: tuple[str, str, str] = ("q", "k", "v")
) -> tuple[int, ...]:
    """Validates ``q [B, T, H, D]``, ``k [B, S, K, D]``, ``v [B, S, K, E]`` (one float dtype,
    ``K`` dividing ``H``, non-empty; ``S == T`` if ``same_length``), calling them ``names`` in
    errors. Returns ``(B, T, S, H, K, D, E)``."""
    qn, kn, vn = names
    B, T, H, D = check_rank(qn, q, ("batch", "q_len", "heads", "head_dim"))
    kshape = check_rank(kn, k, ("batch", "kv_len", "kv_heads", "head_dim"))
    vshape = check_rank(vn, v, ("batch", "kv_len", "kv_heads", "v_head_dim"))
    for name, x in ((qn, q), (kn, k), (vn, v)):
        check_float(name, x)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{qn}, {kn} and {vn} must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    check_dim(kn, kshape, 0, B, f"batch, as in {qn}")
    if same_length:
        check_dim(kn, kshape, 1, T, f"length, as in {qn}")
    check_dim(kn, kshape, 3, D, f"head_dim, as in {qn}")
    if vshape[:3] != kshape[:3]:
        raise ValueError(
            f"{vn} has shape {vshape}; its first three axes must match {kn}'s {kshape[:3]} [batch, kv_len, kv_heads]"
        )
    S, K = kshape[1], kshape[2]
    if H % K:
        raise ValueError(f"{kn} has {K} heads (shape {kshape}), which must divide the {H} query heads of {qn}")
    if T == 0 or S == 0:
        raise ValueError(f"q_len and kv_len must be >= 1; got {qn} shape {tuple(q.shape)}, {kn} shape {kshape}")
    return B, T, S, H, K, D, vshape[3]


def head_features(num_heads, in_features, qkv_features=None) -> tuple[int, int, int]:
    """A module's ``(heads, in_features, qkv_features)``, checked: ``qkv_features`` defaults to
    ``in_features`` and must split evenly into heads."""
    H = positive_int("num_heads", num_heads)
    C = positive_int("in_features", in_features)
    qkv = positive_int("qkv_features", qkv_features or C)
    if qkv % H:
        raise ValueError(f"qkv_features={qkv} must be divisible by num_heads={H}")
    return H, C, qkv


CONVENTIONS = ("paper", "official")


def convention(value) -> str:
    """An op's ``convention=``: ``"paper"`` (the paper's equations) or ``"official"`` (the
    released code's form, where the two differ; each op documents how)."""
    if value not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}; got {value!r}")
    return value
