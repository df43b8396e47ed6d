r"""Attention pooling with learned queries: efficient probing, gated attention MIL (with ACMIL's
branches and stochastic top-K instance masking) and the label attention layer.

* Efficient probing ("Attention, Please! Revisiting Attentive Probing for Masked Image
  Modeling", Psomas et al., 2025; billpsomas/efficient-probing ``poolings/ep.py``): ``M`` learned
  queries, keys = the raw features (no ``W_K``), ``a_m = softmax(q_m X^T / sqrt C)``; the values
  ``V = X W_V`` are cut into ``M`` channel chunks and query ``m`` reads only chunk ``m``.
* Gated attention MIL ("Attention-based Deep Multiple Instance Learning", Ilse et al., 2018):
  ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``, ``z = sum_k a_k h_k``; ACMIL
  (Zhang et al., ECCV 2024): ``M`` branches ``w_m`` and stochastic top-K instance masking.
* Label attention layer ("Rethinking Self-Attention: Towards Interpretability in Neural
  Parsing", Mrini et al., 2020): head ``l`` has a learned query ``q_l``; ``a_l =
  softmax_i(q_l . K_l[i] / sqrt d)`` and each word keeps its label vector ``a_{l,i} V_l[i]``.

All are one softmax over the instances per learned query (no ``[T, S]`` matrix); efficient
probing and MIL pooling run through ``ops.attention`` with the queries as heads sharing one key
head.

Letter legend: B batch, N instances / patches / words, M queries (branches, labels), C features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from attnjax import _checks, masks
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention


def efficient_probe(
    x: Float[Array, "B N C"],
    queries: Float[Array, "M C"],
    values: Float[Array, "B N Cv"],
    *,
    lengths: Int[Array, " B"] | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B Cv"]:
    r"""Efficient probing's pooled vector ``[B, Cv]``: chunk ``m`` of the output is
    ``softmax(q_m X^T / sqrt C) V[:, chunk m]`` (``Cv`` divisible by ``M``).

    The ``M`` queries are ``M`` heads sharing the one key head ``X``; each head attends over all of
    ``V`` and keeps its own chunk (``M`` times the value work of a split-value kernel, the same
    result; separate key/value head counts would remove it).

    >>> import jax.numpy as jnp
    >>> x = jnp.ones((1, 3, 4)); v = jnp.arange(12.0).reshape(1, 3, 4)
    >>> efficient_probe(x, jnp.zeros((2, 4)), v)                 # uniform queries: chunk means
    Array([[4., 5., 6., 7.]], dtype=float32)
    """
    B, N, C = _checks.check_rank("x", x, ("batch", "len", "features"))
    M, Cq = _checks.check_rank("queries", queries, ("queries", "features"))
    Bv, Nv, Cv = _checks.check_rank("values", values, ("batch", "len", "value_features"))
    if Cq != C or (Bv, Nv) != (B, N) or Cv % M:
        raise ValueError(
            f"queries must be [M, C={C}] and values [batch={B}, len={N}, Cv] with M dividing Cv; "
            f"got {queries.shape} and {values.shape}"
        )
    q = jnp.broadcast_to(queries.astype(values.dtype), (B, 1, M, C))
    mask = None if lengths is None else masks.padding(lengths)
    out = attention(
        q, x[:, :, None].astype(values.dtype), values[:, :, None], mask=mask, implementation=implementation
    )  # [B, 1, M, Cv]
    chunks = out[:, 0].reshape(B, M, M, Cv // M)
    return jnp.diagonal(chunks, axis1=1, axis2=2).swapaxes(1, 2).reshape(B, Cv)


def gated_mil_features(h: Float[Array, "B N C"], v_w: Float[Array, "C P"], u_w: Float[Array, "C P"]):
    """``tanh(h V) * sigmoid(h U)`` ``[B, N, P]``: the gated attention features (biases folded in by the caller)."""
    return jnp.tanh(h @ v_w) * jax.nn.sigmoid(h @ u_w)


def stkim_keep(
    scores: Float[Array, "B M N"], key: PRNGKeyArray, top_k: int, p: float
) -> Bool[Array, "B M N"]:
    """ACMIL's stochastic top-K instance masking: per branch, each of the ``top_k`` instances
    with the highest scores is dropped with probability ``p`` (the rest are kept); no gradient."""
    top_k = _checks.positive_int("top_k", top_k)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1]; got {p}")
    N = scores.shape[-1]
    k = min(top_k, N)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores), k)
    in_top = jnp.put_along_axis(jnp.zeros(scores.shape, bool), idx, True, axis=-1, inplace=False)
    drop = jax.random.bernoulli(key, p, scores.shape)
    return ~(in_top & drop)


def gated_mil_pooling(
    h: Float[Array, "B N C"],
    feats: Float[Array, "B N P"],
    w: Float[Array, "M P"],
    *,
    keep: Bool[Array, "B M N"] | None = None,
    lengths: Int[Array, " B"] | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B M C"]:
    r"""``z_m = sum_k softmax_k(w_m . feats_k) h_k`` for each branch ``m`` (``[B, M, C]``), the
    softmax renormalized over the instances ``keep`` allows (from :func:`stkim_keep`) and the
    valid ones (``lengths``). Runs as ``ops.attention`` with the branches as query heads sharing
    one key head (scale 1).

    >>> import jax.numpy as jnp
    >>> h = jnp.arange(6.0).reshape(1, 3, 2)
    >>> gated_mil_pooling(h, jnp.zeros((1, 3, 4)), jnp.ones((1, 4)))   # equal scores: the mean
    Array([[[2., 3.]]], dtype=float32)
    """
    B, N, _ = _checks.check_rank("h", h, ("batch", "instances", "features"))
    M, P = _checks.check_rank("w", w, ("branches", "hidden"))
    if jnp.shape(feats) != (B, N, P):
        raise ValueError(f"feats must be [batch={B}, instances={N}, hidden={P}]; got {jnp.shape(feats)}")
    mask = None if lengths is None else masks.padding(lengths)
    if keep is not None:
        if jnp.shape(keep) != (B, M, N):
            raise ValueError(f"keep must be [batch={B}, branches={M}, instances={N}]; got {jnp.shape(keep)}")
        km = masks.dense(keep[:, :, None, :])
        mask = km if mask is None else mask & km
    q = jnp.broadcast_to(w.astype(feats.dtype), (B, 1, M, P))
    out = attention(
        q,
        feats[:, :, None],
        h[:, :, None].astype(feats.dtype),
        mask=mask,
        scale=1.0,
        implementation=implementation,
    )
    return out[:, 0].astype(h.dtype)


def label_attention(
    queries: Float[Array, "H D"],
    k: Float[Array, "B N H D"],
    v: Float[Array, "B N H E"],
    *,
    lengths: Int[Array, " B"] | None = None,
    scale: float | None = None,
) -> tuple[Float[Array, "B N H E"], Float[Array, "B H N"]]:
    r"""The label attention layer's per-word label vectors ``a_{l,i} V_l[i]`` ``[B, N, H, E]``
    and the weights ``a [B, H, N]`` (``softmax_i(q_l . K_l[i] * scale)``, default scale
    ``1/sqrt(D)``, padded words weight 0). The caller combines the ``H`` label vectors of each
    word (concatenation / projection) and adds them to the word representation.

    >>> import jax.numpy as jnp
    >>> out, a = label_attention(jnp.zeros((1, 2)), jnp.ones((1, 4, 1, 2)), jnp.ones((1, 4, 1, 3)))
    >>> a[0, 0].tolist(), out[0, 0, 0].tolist()                     # uniform: V / N
    ([0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25])
    """
    B, N, H, D = _checks.check_rank("k", k, ("batch", "len", "heads", "head_dim"))
    if jnp.shape(queries) != (H, D) or jnp.shape(v)[:3] != (B, N, H):
        raise ValueError(
            f"queries must be [heads={H}, D={D}] and v [batch, len, heads, E] like k {k.shape}; "
            f"got {jnp.shape(queries)} and {jnp.shape(v)}"
        )
    scale = D**-0.5 if scale is None else scale
    s = (
        jnp.einsum("hd,bnhd->bhn", queries.astype(jnp.float32), k.astype(jnp.float32), precision="highest")
        * scale
    )
    if lengths is not None:
        s = jnp.where(jnp.arange(N)[None, None] < jnp.asarray(lengths)[:, None, None], s, -jnp.inf)
    a = jax.nn.softmax(s, -1)
    return (a.transpose(0, 2, 1)[..., None] * v.astype(jnp.float32)).astype(v.dtype), a
