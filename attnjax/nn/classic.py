r"""Layers of the classic attention mechanisms (zoo part 4): Bahdanau additive attention, BiDAF's
attention flow, efficient probing and gated attention MIL pooling (ACMIL branches). Each is
projections and one :mod:`attnjax.ops` call.

Letter legend: B batch, T queries, S keys / instances, C features, H heads, P hidden, M queries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from attnjax import _checks, ops
from attnjax.nn.sharding import linear, param


def _init(rngs, shape, dtype):
    return nnx.initializers.lecun_normal()(rngs.params(), shape, dtype or jnp.float32)


class AdditiveAttention(nnx.Module):
    r"""Bahdanau attention: ``e_ij = w_h . tanh(W q_i + b + U k_j)``, ``c_i = sum_j
    softmax_j(e_ij) v_j`` (values default to the keys), ``H`` heads concatenated.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> att = nn.AdditiveAttention(4, 6, 8, rngs=nnx.Rngs(0))
    >>> att(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 6))).shape
    (2, 3, 6)
    """

    def __init__(
        self,
        query_features: int,
        key_features: int,
        hidden: int,
        *,
        num_heads: int = 1,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        Cq, Ck, P, H = (
            _checks.positive_int(n, x)
            for n, x in (
                ("query_features", query_features),
                ("key_features", key_features),
                ("hidden", hidden),
                ("num_heads", num_heads),
            )
        )
        self.heads, self.hidden, self.implementation = H, P, implementation
        self.w_query = linear(Cq, H * P, ("embed", "heads"), dtype=dtype, rngs=rngs)
        self.w_key = linear(Ck, H * P, ("embed", "heads"), use_bias=False, dtype=dtype, rngs=rngs)
        self.v = param(_init(rngs, (H, P), dtype), "heads", None)

    def __call__(
        self,
        query: Float[Array, "B T Cq"],
        keys: Float[Array, "B S Ck"],
        values: Float[Array, "B S Cv"] | None = None,
        mask=None,
    ) -> Float[Array, "B T HCv"]:
        values = keys if values is None else values
        B, T, S = query.shape[0], query.shape[1], keys.shape[1]
        a = self.w_query(query).reshape(B, T, self.heads, self.hidden)
        c = self.w_key(keys).reshape(B, S, self.heads, self.hidden)
        v = jnp.broadcast_to(values[:, :, None], (B, S, self.heads, values.shape[-1]))
        out = ops.additive_attention(
            a,
            c,
            v.astype(a.dtype),
            self.v[...].astype(a.dtype),
            mask=mask,
            implementation=self.implementation,
        )
        return out.reshape(B, T, -1)


class BiDAFAttention(nnx.Module):
    """BiDAF's attention flow layer with its trilinear weight ``w [3C]``: ``G [B, T, 4C]``
    (:func:`attnjax.ops.bidaf_attention`)."""

    def __init__(self, features: int, *, implementation=None, dtype=None, rngs: nnx.Rngs):
        C = _checks.positive_int("features", features)
        self.implementation = implementation
        self.w = param(
            jax.random.uniform(rngs.params(), (3 * C,), dtype or jnp.float32, -1, 1) / jnp.sqrt(3 * C), None
        )

    def __call__(
        self,
        h: Float[Array, "B T C"],
        u: Float[Array, "B J C"],
        *,
        context_lengths: Int[Array, " B"] | None = None,
        query_lengths: Int[Array, " B"] | None = None,
    ):
        return ops.bidaf_attention(
            h,
            u,
            self.w[...].astype(h.dtype),
            context_lengths=context_lengths,
            query_lengths=query_lengths,
            implementation=self.implementation,
        )


class EfficientProbe(nnx.Module):
    """Efficient probing: ``num_queries`` learned queries over the raw features (no ``W_K``),
    values ``X W_V`` of ``C / d_out`` features split into one chunk per query; output
    ``[B, C / d_out]`` for a linear classifier (:func:`attnjax.ops.efficient_probe`)."""

    def __init__(
        self,
        features: int,
        num_queries: int,
        *,
        d_out: int = 1,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        C, M, d = (
            _checks.positive_int(n, x)
            for n, x in (("features", features), ("num_queries", num_queries), ("d_out", d_out))
        )
        if C % d or (C // d) % M:
            raise ValueError(f"features={C} / d_out={d} must be a multiple of num_queries={M}")
        self.implementation = implementation
        self.queries = param(
            0.02 * jax.random.normal(rngs.params(), (M, C), dtype or jnp.float32), None, "embed"
        )
        self.w_value = linear(C, C // d, ("embed", "mlp"), use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: Float[Array, "B N C"], lengths: Int[Array, " B"] | None = None
    ) -> Float[Array, "B Cv"]:
        return ops.efficient_probe(
            x,
            self.queries[...].astype(x.dtype),
            self.w_value(x),
            lengths=lengths,
            implementation=self.implementation,
        )


class GatedMILPooling(nnx.Module):
    """Gated attention MIL pooling with ``branches`` attention branches (ACMIL): ``z [B, M, C]``
    and, in training with ``key`` and ``top_k``, stochastic top-K instance masking with drop
    probability ``p`` (:func:`attnjax.ops.gated_mil_pooling`, :func:`attnjax.ops.stkim_keep`)."""

    def __init__(
        self,
        features: int,
        hidden: int,
        *,
        branches: int = 1,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        C, P, M = (
            _checks.positive_int(n, x)
            for n, x in (("features", features), ("hidden", hidden), ("branches", branches))
        )
        self.implementation = implementation
        self.attn_v = linear(C, P, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.attn_u = linear(C, P, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.w = param(_init(rngs, (M, P), dtype), None, "mlp")

    def scores(self, h: Float[Array, "B N C"]) -> Float[Array, "B M N"]:
        """The branches' attention logits (for ACMIL's diversity loss and STKIM)."""
        feats = jnp.tanh(self.attn_v(h)) * jax.nn.sigmoid(self.attn_u(h))
        return jnp.einsum("bnp,mp->bmn", feats, self.w[...].astype(feats.dtype))

    def __call__(
        self,
        h: Float[Array, "B N C"],
        lengths: Int[Array, " B"] | None = None,
        *,
        key=None,
        top_k: int | None = None,
        p: float = 0.0,
    ) -> Float[Array, "B M C"]:
        feats = jnp.tanh(self.attn_v(h)) * jax.nn.sigmoid(self.attn_u(h))
        keep = None
        if key is not None and top_k is not None and p > 0:
            keep = ops.stkim_keep(self.scores(h), key, top_k, p)
        return ops.gated_mil_pooling(
            h,
            feats,
            self.w[...].astype(feats.dtype),
            keep=keep,
            lengths=lengths,
            implementation=self.implementation,
        )


class LabelAttention(nnx.Module):
    r"""The label attention layer (LAL): each of ``num_labels`` heads has a learned query (no
    query matrix), ``a_l = softmax_i(q_l . K_l[i] / sqrt(d))``; word ``i`` keeps its label vectors
    ``a_{l,i} V_l[i]``, which are concatenated over labels, projected back to ``C`` and added to
    the word (:func:`attnjax.ops.label_attention`). Returns ``(y [B, N, C], a [B, L, N])``."""

    def __init__(self, features: int, num_labels: int, head_dim: int, *, dtype=None, rngs: nnx.Rngs):
        C, L, D = (
            _checks.positive_int(n, x)
            for n, x in (("features", features), ("num_labels", num_labels), ("head_dim", head_dim))
        )
        self.labels, self.head_dim = L, D
        self.queries = param(_init(rngs, (L, D), dtype), "heads", "head_dim")
        self.key = linear(C, L * D, ("embed", "heads"), use_bias=False, dtype=dtype, rngs=rngs)
        self.value = linear(C, L * D, ("embed", "heads"), use_bias=False, dtype=dtype, rngs=rngs)
        self.out = linear(L * D, C, ("heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B N C"], lengths: Int[Array, " B"] | None = None):
        B, N, _ = x.shape
        split = lambda y: y.reshape(B, N, self.labels, self.head_dim)
        per_word, a = ops.label_attention(
            self.queries[...].astype(x.dtype), split(self.key(x)), split(self.value(x)), lengths=lengths
        )
        return x + self.out(per_word.reshape(B, N, -1)), a
