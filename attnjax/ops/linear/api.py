r"""Linear attention: ``phi(Q) (phi(K)^T V)``, ``O(T)`` time and memory, with a choice of feature
map and normalization.

.. math::

    n_i = \phi(q_i) \sum_{j} \phi(k_j)^\top v_j,\qquad
    d_i = \phi(q_i) \cdot \sum_{j} \phi(k_j),\qquad
    o_i = n_i / d_i \quad\text{(standard)},

with sums over all keys, or over ``j <= i`` when causal. Letter legend: B batch, T query
length, S key length, H query heads, K key/value heads (K divides H), D head dim, E value dim.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.features import FEATURE_MAPS, FeatureMap
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.linear import reference, xla

NORMALIZATIONS = ("standard", "inline", "mala", "none")


def linear_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    *,
    feature_map: str | Callable | tuple[Callable, Callable] = "elu1",
    is_causal: bool = False,
    normalize: bool | str = True,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    r"""Linear attention with a feature map and a normalization.

    With ``n_i``, ``d_i`` as in the module docstring, ``\bar v_i = \sum_j v_j`` and ``N_i`` the
    number of keys query ``i`` sees (``S``, or ``i + 1`` when causal), ``normalize`` picks:

    * ``"standard"``: ``o_i = n_i / d_i`` ("Transformers are RNNs", Katharopoulos et al., 2020);
    * ``"none"`` (or ``False``): ``o_i = n_i``;
    * ``"inline"``: ``o_i = n_i - (d_i / N_i) \bar v_i + \bar v_i / N_i`` (InLine, Han et al., 2024:
      weights ``phi(q_i).phi(k_j) - d_i / N_i + 1 / N_i`` that sum to one without a division);
    * ``"mala"``: ``o_i = (1 + 1 / d_i)\, n_i - (d_i / N_i) \bar v_i`` (MALA, Fan et al., 2025:
      weights that sum to one and grow with the query's magnitude);
    * ``True``: the feature map's own (``"inline"`` for ``feature_map="inline"``, ``"mala"`` for
      ``"mala"``, else ``"standard"``).

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, S, K, D]`` (``S == T`` when causal); ``K`` divides ``H``.
      v: values ``[B, S, K, E]``.
      feature_map: a name in :data:`attnjax.features.FEATURE_MAPS` (``"identity"``, ``"elu1"``,
        ``"relu"``, ``"softmax"`` (Efficient Attention; not causal), ``"inline"``, ``"mala"``), a
        function applied to both ``q`` and ``k`` (e.g. ``functools.partial(
        features.positive_random_features, projection=w)``), or a pair ``(phi_q, phi_k)``.
      is_causal: query ``i`` sees keys ``j <= i`` (top-left aligned; needs ``S == T``).
      normalize: see above.
      implementation: ``"reference"`` (dense ``[T, S]`` weights), ``"xla"`` (``O(T)``: summed
        ``phi(K)^T V`` when not causal; chunked lightning attention with no decay when causal),
        ``"pallas"`` (causal only: the lightning kernel), ``None`` or a sequence.

    Returns:
      ``[B, T, H, E]`` in ``q.dtype``. Feature maps and sums run in float32.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 40, 4, 8))
    >>> out = ops.linear_attention(q, k, v, is_causal=True)
    >>> ref = ops.linear_attention(q, k, v, is_causal=True, implementation="reference")
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-4))
    ((2, 40, 4, 8), True)
    """
    norm, phi_q, phi_k, v32 = prepare(q, k, v, feature_map, is_causal, normalize)

    def fast(impl):
        def run():
            if is_causal:  # lightning attention without decay, on its own xla or pallas path
                return xla.causal(norm, phi_q, phi_k, v32, impl)
            if impl == "pallas":
                raise NotImplementedError("non-causal linear attention has no kernel (its xla form is two matmuls)")
            return xla.summed(norm, phi_q, xla.summaries(phi_k, v32))
        return run

    impls = {"reference": lambda: reference.dense(norm, phi_q, phi_k, v32, is_causal),
             "xla": fast("xla"), "pallas": fast("pallas")}
    return dispatch.run("linear_attention", impls, implementation).astype(q.dtype)


def prepare(q, k, v, feature_map, is_causal, normalize):
    """Validates; returns the normalization and float32 ``phi(q)``, ``phi(k)``, ``v`` (K/V
    heads repeated to ``H``)."""
    B, T, S, H, K, D, E = _checks.check_qkv(q, k, v)
    if is_causal and S != T:
        raise ValueError(f"is_causal needs kv_len == q_len; got q shape {tuple(q.shape)}, k shape {tuple(k.shape)}")
    fmap = _feature_map(feature_map)
    if is_causal and not fmap.causal_ok:
        raise ValueError(f"feature_map={feature_map!r} mixes positions along the sequence, so it cannot be causal")
    norm = _normalization(normalize, fmap)
    f32 = lambda x: x.astype(jnp.float32)
    G = H // K
    phi_q = f32(fmap.query(f32(q)))
    phi_k, v32 = (jnp.repeat(x, G, axis=2) if G > 1 else x for x in (f32(fmap.key(f32(k))), f32(v)))
    if phi_q.shape[-1] != phi_k.shape[-1]:
        raise ValueError(f"feature maps of q and k must have one width; got {phi_q.shape} and {phi_k.shape}")
    return norm, phi_q, phi_k, v32


def _feature_map(feature_map) -> FeatureMap:
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {tuple(FEATURE_MAPS)}, a callable or a pair; got {feature_map!r}")
        return FEATURE_MAPS[feature_map]
    if callable(feature_map):
        return FeatureMap(feature_map, feature_map, "standard")
    if isinstance(feature_map, tuple) and len(feature_map) == 2 and all(map(callable, feature_map)):
        return FeatureMap(feature_map[0], feature_map[1], "standard")
    raise TypeError(f"feature_map must be a name, a callable or a pair of callables; got {feature_map!r}")


def _normalization(normalize, fmap: FeatureMap) -> str:
    if normalize is True:
        return fmap.normalization
    if normalize is False:
        return "none"
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be a bool or one of {NORMALIZATIONS}; got {normalize!r}")
    return normalize
