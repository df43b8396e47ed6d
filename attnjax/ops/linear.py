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

from collections.abc import Callable, Sequence

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.features import FEATURE_MAPS, FeatureMap
from attnjax.ops import _dispatch
from attnjax.ops.lightning import lightning_attention

Implementation = str | Sequence[str] | None
NORMALIZATIONS = ("standard", "inline", "mala", "none")
_EPS = 1e-6
HI = lax.Precision.HIGHEST


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
    norm, phi_q, phi_k, v32 = _prepare(q, k, v, feature_map, is_causal, normalize)

    def xla():
        return causal(norm, phi_q, phi_k, v32, "xla") if is_causal else summed(norm, phi_q, summaries(phi_k, v32))

    def pallas():
        if not is_causal:
            raise NotImplementedError("non-causal linear attention has no kernel (its xla form is two matmuls)")
        return causal(norm, phi_q, phi_k, v32, "pallas")

    impls = {"reference": lambda: _dense(norm, phi_q, phi_k, v32, is_causal), "xla": xla, "pallas": pallas}
    return _dispatch.run("linear_attention", impls, implementation).astype(q.dtype)


def _prepare(q, k, v, feature_map, is_causal, normalize):
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


def summaries(phi_k, v):
    """What non-causal linear attention needs of the keys, all sums over them (so shards of the
    sequence combine by adding): ``(sum phi(k)^T v [B,H,D,E], sum phi(k) [B,H,D],
    sum v [B,1,H,E], count)``."""
    return (jnp.einsum("bshd,bshe->bhde", phi_k, v, precision=HI), phi_k.sum(1),
            v.sum(1, keepdims=True), jnp.float32(phi_k.shape[1]))


def summed(norm, phi_q, sums):
    """Non-causal outputs from the key :func:`summaries`."""
    kv, ksum, vsum, count = sums
    num = jnp.einsum("bthd,bhde->bthe", phi_q, kv, precision=HI)
    den = jnp.einsum("bthd,bhd->bth", phi_q, ksum, precision=HI)
    return _finish(norm, num, den, vsum, count)


def causal(norm, phi_q, phi_k, v, implementation=None, lightning=None, vsum_before=0.0, count_before=0):
    """Causal outputs. The sums over ``j <= i`` are lightning attention without decay (a column
    of ones gives ``d_i`` too); a sequence shard passes its own ``lightning`` (state passing)
    and the sum of ``v`` and count of the tokens before it."""
    if lightning is None:
        lightning = lambda *a: lightning_attention(*a, scale=1.0, implementation=implementation)
    T = phi_q.shape[1]
    v_ones = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), jnp.float32)], -1)
    nd = lightning(phi_q, phi_k, v_ones)
    counts = count_before + jnp.arange(1, T + 1, dtype=jnp.float32)[None, :, None, None]
    return _finish(norm, nd[..., :-1], nd[..., -1], vsum_before + jnp.cumsum(v, axis=1), counts)


def _safe(den):
    # Guards d_i ~ 0 (possible for sign-indefinite maps such as identity) against inf/NaN.
    return jnp.where(jnp.abs(den) < _EPS, _EPS, den)


def _finish(norm, num, den, vsum, count):
    """Outputs from ``n_i`` ``[B,T,H,E]``, ``d_i`` ``[B,T,H]``, ``sum v`` and ``N_i``."""
    den = den[..., None]
    if norm == "none":
        return num
    if norm == "standard":
        return num / _safe(den)
    if norm == "inline":
        return num - den / count * vsum + vsum / count
    return (1.0 + 1.0 / _safe(den)) * num - den / count * vsum  # mala


def _dense(norm, phi_q, phi_k, v, is_causal):
    """The weights ``[B, H, T, S]`` written out and normalized as in the papers."""
    w = jnp.einsum("bthd,bshd->bhts", phi_q, phi_k, precision=HI)
    T, S = w.shape[-2:]
    seen = jnp.tril(jnp.ones((T, S), bool)) if is_causal else jnp.ones((T, S), bool)
    w = jnp.where(seen, w, 0.0)
    den = w.sum(-1, keepdims=True)
    n = seen.sum(-1, keepdims=True).astype(jnp.float32)
    if norm == "standard":
        w = w / _safe(den)
    elif norm == "inline":
        w = jnp.where(seen, w - den / n + 1.0 / n, 0.0)
    elif norm == "mala":
        w = jnp.where(seen, (1.0 + 1.0 / _safe(den)) * w - den / n, 0.0)
    return jnp.einsum("bhts,bshe->bthe", w, v, precision=HI)


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
