"""Dropout on attention weights that every implementation agrees on.

Whether weight ``(b, h, q, kv)`` is kept is a counter-based hash of the key and the four
indices, not a random draw per tile: the dense reference, the blockwise XLA path and the Pallas
kernels drop exactly the same entries whatever their tiling, and a backward pass recomputes the
same mask instead of storing it. Kept weights are scaled by ``1 / (1 - rate)``.

For softmax the row sum is taken *before* dropout (as in standard attention dropout:
``O = dropout(softmax(S)) V``), so dropped weights are simply zeroed.

>>> import jax, jax.numpy as jnp
>>> from attnjax.dropout import Dropout
>>> d = Dropout.make(0.5, jax.random.key(0))
>>> keep = d.scale(*(jnp.arange(n).reshape(s) for n, s in ((1, (1,1,1,1)), (1, (1,1,1,1)), (64, (1,1,64,1)), (64, (1,1,1,64)))))
>>> bool(abs(float((keep > 0).mean()) - 0.5) < 0.05), float(keep.max())
(True, 2.0)
"""

from __future__ import annotations

import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array

from attnjax.core.pytree import pytree_dataclass
from attnjax.core.tiling import take

_GOLDEN = 0x9E3779B9


def _mix(x: Array) -> Array:
    """MurmurHash3's 32-bit finalizer: a bijection on uint32 with good avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def check_rate(rate) -> float:
    """``rate`` as a float in ``[0, 1)``; it is static (it decides whether and how dropout runs):
    a value traced under ``jit`` is refused with the way out."""
    if isinstance(rate, jax.core.Tracer):
        raise TypeError("dropout_rate must be a Python number, static under jit (pass it through "
                        "jax.jit's static_argnames, or close over it); got a traced value")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be a Python number in [0, 1); got {rate!r}")
    return float(rate)


@pytree_dataclass(data=("seed",), meta=("rate",))
class Dropout:
    rate: float
    seed: Array  # uint32[2], from the key

    INDEXED: ClassVar = {"seed": (None,)}

    @classmethod
    def make(cls, rate: float, key) -> "Dropout":
        rate = check_rate(rate)
        if key is None:
            raise ValueError("dropout_rate > 0 needs dropout_key (a jax.random key)")
        if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        key = jnp.asarray(key)
        if not jnp.issubdtype(key.dtype, jnp.unsignedinteger) or key.size < 2:
            raise TypeError(f"dropout_key must be a jax.random key; got {key.dtype}{list(key.shape)}")
        return cls(float(rate), key.reshape(-1)[:2].astype(jnp.uint32))

    def scale(self, b, h, q_idx, kv_idx) -> Array:
        """``keep / (1 - rate)`` for broadcasting index arrays (float32)."""
        u32 = lambda x: jnp.asarray(x).astype(jnp.uint32)
        seed0, seed1 = take(self.seed, 0), take(self.seed, 1)
        x = _mix(seed0 + u32(b) * jnp.uint32(_GOLDEN))
        x = _mix(x ^ u32(h))
        x = _mix(x ^ u32(q_idx))
        x = _mix(x ^ u32(kv_idx) ^ seed1)
        threshold = jnp.uint32(min(int(self.rate * 2.0**32), 2**32 - 1))
        return jnp.where(x >= threshold, 1.0 / (1.0 - self.rate), 0.0).astype(jnp.float32)
