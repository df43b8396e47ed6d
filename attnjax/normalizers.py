"""Normalizers: how scores become attention weights.

Two families, and the blockwise implementations treat them differently:

* **row-normalized** (``softmax``): weights depend on the whole row, so tiles keep a running
  max and sum ("online softmax") and the op can return the log-sum-exp;
* **elementwise** (``sigmoid``, ``relu``, ``identity``, or your own): ``w = f(s)`` entry by
  entry, so tiles just accumulate ``f(S) V``; no row statistics, no rescaling, and the backward
  pass needs no ``rowsum(dO * O)`` pre-pass.

Masked entries always get weight exactly zero; a row with every key masked gives zeros.
Elementwise normalizers are pytrees: a learnable sigmoid bias gets its gradient.

>>> import jax.numpy as jnp
>>> from attnjax import normalizers
>>> normalizers.sigmoid(bias=0.0).weights(4, jnp.zeros(2))
Array([0.5, 0.5], dtype=float32)
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from attnjax.core.pytree import pytree_dataclass

# Masked scores are set to this finite value in dense softmax (not -inf) so that a fully
# masked row gives finite gradients; its weights are then zeroed explicitly.
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


class Normalizer:
    """Base class. ``row_normalized`` says which family the normalizer belongs to."""

    row_normalized: bool = False

    def weights(self, kv_len: int, s: Array) -> Array:
        """Elementwise weights ``f(s)`` (elementwise normalizers only)."""
        raise NotImplementedError

    def dense(self, kv_len: int, s: Array, allowed: Array) -> Array:
        """Weights of a whole ``[..., S]`` score matrix with boolean ``allowed`` (reference)."""
        return jnp.where(allowed, self.weights(kv_len, jnp.where(allowed, s, 0.0)), 0.0)


@pytree_dataclass()
class Softmax(Normalizer):
    """``softmax(s)`` over the keys of each row."""

    row_normalized = True

    def dense(self, kv_len, s, allowed):
        w = jax.nn.softmax(jnp.where(allowed, s, MASKED), axis=-1)
        return jnp.where(allowed, w, 0.0)


@pytree_dataclass(data=("bias",))
class Sigmoid(Normalizer):
    """``sigmoid(s + bias)``; ``bias=None`` means ``-log(S)`` (Ramapuram et al., 2024)."""

    bias: Array | None = None

    def weights(self, kv_len, s):
        bias = -math.log(kv_len) if self.bias is None else jnp.asarray(self.bias, jnp.float32)
        return jax.nn.sigmoid(s + bias)


@pytree_dataclass()
class Relu(Normalizer):
    """``relu(s) / S`` ("Replacing softmax with ReLU in Vision Transformers", Wortsman et al.)."""

    def weights(self, kv_len, s):
        return jax.nn.relu(s) / kv_len


@pytree_dataclass()
class Identity(Normalizer):
    """Unnormalized: the weights are the scores themselves."""

    def weights(self, kv_len, s):
        return s


@pytree_dataclass(meta=("fn",))
class Elementwise(Normalizer):
    """Any elementwise ``fn(s)``, applied to float32 scores."""

    fn: Callable

    def weights(self, kv_len, s):
        return self.fn(s)


def softmax() -> Normalizer:
    return Softmax()


def sigmoid(bias: float | Array | None = None) -> Normalizer:
    """Sigmoid normalizer; ``bias`` defaults to ``-log(S)`` with ``S`` the key length.

    A concrete ``bias`` must be a finite scalar (a traced one, e.g. learned, is not checked)."""
    if bias is None:
        return Sigmoid(None)
    if jnp.ndim(bias) != 0:
        raise ValueError(f"sigmoid_bias must be a scalar; got shape {jnp.shape(bias)}")
    if not isinstance(bias, jax.core.Tracer) and not np.isfinite(np.asarray(bias, np.float32)):
        raise ValueError(f"sigmoid_bias must be finite; got {bias!r}")
    return Sigmoid(jnp.asarray(bias, jnp.float32))


def relu() -> Normalizer:
    return Relu()


def identity() -> Normalizer:
    return Identity()


def elementwise(fn: Callable[[Array], Array]) -> Normalizer:
    """Your own elementwise normalizer ``w = fn(s)``."""
    if not callable(fn):
        raise TypeError(f"normalizers.elementwise needs a callable; got {fn!r}")
    return Elementwise(fn)


_BY_NAME = {"softmax": softmax, "sigmoid": sigmoid, "relu": relu, "identity": identity}


def as_normalizer(normalizer: str | Normalizer, sigmoid_bias=None) -> Normalizer:
    """Resolves the ``normalizer`` argument of the ops (a name or a Normalizer)."""
    if isinstance(normalizer, Normalizer):
        if sigmoid_bias is not None:
            raise ValueError("sigmoid_bias is only used with normalizer='sigmoid'")
        return normalizer
    if normalizer not in _BY_NAME:
        raise ValueError(
            f"normalizer must be one of {sorted(_BY_NAME)} or a Normalizer; got {normalizer!r}"
        )
    if normalizer == "sigmoid":
        return sigmoid(sigmoid_bias)
    if sigmoid_bias is not None:
        raise ValueError(f"sigmoid_bias is only used with normalizer='sigmoid'; got {normalizer!r}")
    return _BY_NAME[normalizer]()


# -- row standardization (normalized attention pooling; zoo part 3, issue 22) ---------------------


@pytree_dataclass(data=("gain", "shift"), meta=("eps",))
class Standardize(Normalizer):
    """``g_h (s - mu_i) / sigma_i + b_h`` over each row's allowed keys (weights may be negative).

    Row-statistic but not a softmax: the blockwise paths have no running mean/variance, so they
    decline (``NotImplementedError``, and dispatch falls through to the reference); the linear
    ``O(T D^2)`` form of the unmasked and causal cases is :func:`attnjax.ops.nap_attention`."""

    gain: Array  # scalar or [H]
    shift: Array  # scalar or [H]
    eps: float = 1e-16

    def weights(self, kv_len, s):
        raise NotImplementedError("normalizers.standardize needs each row's mean and variance; only the dense "
                                  "reference computes them (ops.nap_attention has the linear form)")

    def dense(self, kv_len, s, allowed):
        per_head = lambda x: jnp.reshape(jnp.asarray(x, jnp.float32), (-1, 1, 1) if jnp.ndim(x) else ())
        n = allowed.sum(-1, keepdims=True).astype(jnp.float32)
        safe_n = jnp.maximum(n, 1.0)
        s = jnp.where(allowed, s, 0.0)
        mu = s.sum(-1, keepdims=True) / safe_n
        var = jnp.where(allowed, (s - mu) ** 2, 0.0).sum(-1, keepdims=True) / safe_n + self.eps
        w = per_head(self.gain) * (s - mu) / jnp.sqrt(var) + per_head(self.shift)
        return jnp.where(allowed, w, 0.0)


def standardize(gain: float | Array = 1.0, shift: float | Array = 0.0) -> Normalizer:
    """Row standardization of normalized attention pooling ("Normalized Attention Without
    Probability Cage", Richter & Wattenhofer, 2020): ``w_ij = g (s_ij - mu_i) / sigma_i + b`` with
    the mean and variance (``+ 1e-16``) of row ``i``'s allowed scores; ``gain``/``shift`` scalars or
    per head ``[H]`` (they get gradients).

    >>> import jax.numpy as jnp
    >>> w = standardize().dense(3, jnp.array([[1.0, 2.0, 3.0]]), jnp.ones((1, 3), bool))
    >>> print(*(f"{x:.4f}" for x in w[0].tolist()))
    -1.2247 0.0000 1.2247
    """
    return Standardize(jnp.asarray(gain, jnp.float32), jnp.asarray(shift, jnp.float32))
