"""Head-structure layers (issue 22): how the heads get their queries, keys and values. Multiple
head embeddings (MHE), the optimised / efficient / super attention of "You Need to Pay Better
Attention", minimal (collapsed or symmetric) query-key attention, and DiffQKV's differently
compressed keys and values. Each ``__call__`` is its projections and one
:func:`attnjax.ops.attention` (or :func:`attnjax.ops.diffqkv_attention`) call.

Letter legend: B batch, T tokens, H heads, D head dim, C features.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, masks, ops
from attnjax.masks import Mask
from attnjax.nn.attention import check_module_mask
from attnjax.nn.layers import head_projections, projection_axes
from attnjax.nn.sharding import linear, param


def _check_x(x, C: int) -> None:
    if x.ndim != 3 or x.shape[-1] != C:
        raise ValueError(f"x must have shape [batch, seq, in_features={C}]; got {x.shape}")


def _out(H: int, D: int, C: int, use_bias: bool, dtype, rngs) -> nnx.LinearGeneral:
    return nnx.LinearGeneral(
        (H, D),
        C,
        axis=(-2, -1),
        use_bias=use_bias,
        dtype=dtype,
        rngs=rngs,
        **projection_axes("heads", "head_dim", "embed", inputs=2),
    )


class MHEAttention(nnx.Module):
    r"""Multiple head embeddings ("Pit One Against Many: Leveraging Attention-head Embeddings for
    Parameter-efficient Multi-head Attention", Xue & Aletras, 2023).

    One shared projection per role, ``Q = X W_Q``, ``K = X W_K``, ``V = X W_V`` (``C -> D``), and
    per-head embeddings ``e^Q_h, e^K_h, e^V_h`` (``D`` each): ``Q_h = Q + e^Q_h`` (``mode="add"``) or
    ``Q_h = Q * e^Q_h`` (``"mul"``), likewise ``K``, ``V``; then multi-head attention. ``3 H D`` extra
    parameters instead of ``3 (H - 1) C D``. Under ``"add"`` the key embedding only shifts each
    query's scores by a constant, which softmax ignores. Embeddings start random (``N(0, 1)`` for
    ``add``, ``1 + N(0, 0.1)`` for ``mul``: our choice) so that the heads differ.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.MHEAttention(4, 16, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 9, 16))).shape
    (1, 9, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        head_dim: int | None = None,
        mode: str = "add",
        mask: Mask | None = None,
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, qkv = _checks.head_features(num_heads, in_features)
        D = _checks.positive_int("head_dim", head_dim or qkv // H)
        if mode not in ("add", "mul"):
            raise ValueError(f"mode must be 'add' or 'mul'; got {mode!r}")
        self.in_features, self.mode, self.mask, self.implementation = (
            C,
            mode,
            check_module_mask(mask),
            implementation,
        )
        self.query, self.key, self.value = (
            linear(C, D, ("embed", "head_dim"), use_bias=use_bias, dtype=dtype, rngs=rngs) for _ in range(3)
        )
        draw = lambda: jax.random.normal(rngs.params(), (H, D))
        init = (lambda: draw()) if mode == "add" else (lambda: 1.0 + 0.1 * draw())
        self.embed_q, self.embed_k, self.embed_v = (param(init(), "heads", "head_dim") for _ in range(3))
        self.out = _out(H, D, C, use_bias, dtype, rngs)

    def project(self, x):
        """``(q, k, v)`` ``[B, T, H, D]``: the shared projections combined with each head's embedding."""
        comb = (
            (lambda a, e: a[:, :, None] + e[...])
            if self.mode == "add"
            else (lambda a, e: a[:, :, None] * e[...])
        )
        return (
            comb(self.query(x), self.embed_q),
            comb(self.key(x), self.embed_k),
            comb(self.value(x), self.embed_v),
        )

    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        _check_x(x, self.in_features)
        q, k, v = self.project(x)
        return self.out(ops.attention(q, k, v, mask=self.mask, implementation=self.implementation))


KINDS = ("optimised", "efficient", "super")


class PayBetterAttention(nnx.Module):
    r"""Optimised, efficient and super attention ("You Need to Pay Better Attention: Rethinking the
    Mathematics of Attention Mechanism", Hosseini & Hosseini, 2024).

    * ``"optimised"``: no ``W_V``: head ``h``'s values are the input's ``h``-th slice of ``C / H``
      features (``W_Q``, ``W_K``, ``W_O`` kept: 3/4 of the parameters);
    * ``"efficient"``: no ``W_K`` either: keys are the input slices too;
    * ``"super"``: efficient plus a learned ``l x l`` alignment ``W_A`` mixing the value sequence,
      ``V_h = W_A X_h`` (a fixed length ``seq_len = l``; identity at init). ``W_A`` mixes all
      positions, so a causal mask does not make ``super`` causal.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.PayBetterAttention(4, 16, kind="super", seq_len=9, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 9, 16))).shape
    (1, 9, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        kind: str = "optimised",
        seq_len: int | None = None,
        mask: Mask | None = None,
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, _ = _checks.head_features(num_heads, in_features)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
        D = C // H
        self.in_features, self.kind, self.heads = C, kind, H
        self.mask, self.implementation = check_module_mask(mask), implementation
        lin = lambda: nnx.LinearGeneral(
            C,
            (H, D),
            use_bias=use_bias,
            dtype=dtype,
            rngs=rngs,
            **projection_axes("embed", "heads", "head_dim"),
        )
        self.query = lin()
        self.key = lin() if kind == "optimised" else nnx.data(None)
        if kind == "super":
            n = _checks.positive_int("seq_len", seq_len)
            self.align = param(jnp.eye(n), None, None)
        else:
            self.align = nnx.data(None)
        self.out = _out(H, D, C, use_bias, dtype, rngs)

    def project(self, x):
        """``(q, k, v)`` ``[B, T, H, C / H]``."""
        B, T, C = x.shape
        slices = x.reshape(B, T, self.heads, C // self.heads)
        k = self.key(x) if self.key is not None else slices
        v = slices
        if self.align is not None:
            if T != self.align.shape[0]:
                raise ValueError(
                    f"super attention has a fixed length seq_len={self.align.shape[0]}; got {T} tokens"
                )
            v = jnp.einsum("ts,bshd->bthd", self.align[...].astype(x.dtype), v)
        return self.query(x), k, v

    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        _check_x(x, self.in_features)
        return self.out(ops.attention(*self.project(x), mask=self.mask, implementation=self.implementation))


class MinimalAttention(nnx.Module):
    r"""Minimal query-key attention ("Reducing the Transformer Architecture to a Minimum",
    Bermeitinger et al., 2024; "Low-Rank Bottleneck in Multi-head Attention Models", Bhojanapalli
    et al., 2020).

    * ``qk="collapsed"``: one ``C x C`` matrix per head, ``s_ij = x_i^T W_QK x_j`` (queries
      ``x W_QK``, the raw tokens as a single shared key head);
    * ``qk="symmetric"``: ``W_QK = U U^T``, queries and keys both ``x U`` (``C -> qk_dim`` per head,
      half the parameters), so ``s_ij = s_ji``;
    * ``qk_dim``: the q/k head width, free of ``C / H`` (Bhojanapalli et al. set it to the sequence
      length);
    * ``values="identity"`` omits ``W_V`` (head ``h`` reads the input's ``h``-th slice) and
      ``"projected"`` keeps it; ``W_O`` is kept.

    Scores are scaled by ``1 / sqrt(width)`` of the q/k vectors, as usual.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.MinimalAttention(2, 16, qk="symmetric", qk_dim=5, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 9, 16))).shape
    (1, 9, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        qk: str = "symmetric",
        qk_dim: int | None = None,
        values: str = "projected",
        mask: Mask | None = None,
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, _ = _checks.head_features(num_heads, in_features)
        if qk not in ("collapsed", "symmetric"):
            raise ValueError(f"qk must be 'collapsed' or 'symmetric'; got {qk!r}")
        if values not in ("identity", "projected"):
            raise ValueError(f"values must be 'identity' or 'projected'; got {values!r}")
        D = C // H
        R = _checks.positive_int("qk_dim", qk_dim or D)
        self.in_features, self.qk, self.heads = C, qk, H
        self.mask, self.implementation = check_module_mask(mask), implementation
        width = C if qk == "collapsed" else R
        self.qk_proj = nnx.LinearGeneral(
            C, (H, width), use_bias=False, dtype=dtype, rngs=rngs, **projection_axes("embed", "heads", None)
        )
        self.value = (
            nnx.LinearGeneral(
                C,
                (H, D),
                use_bias=use_bias,
                dtype=dtype,
                rngs=rngs,
                **projection_axes("embed", "heads", "head_dim"),
            )
            if values == "projected"
            else nnx.data(None)
        )
        self.out = _out(H, D, C, use_bias, dtype, rngs)

    def project(self, x):
        """``(q, k, v)``: for ``"collapsed"``, ``k`` is ``x`` itself as one key head."""
        B, T, C = x.shape
        q = self.qk_proj(x)
        k = x[:, :, None, :] if self.qk == "collapsed" else q
        v = self.value(x) if self.value is not None else x.reshape(B, T, self.heads, C // self.heads)
        return q, k, v

    def scores(self, x: Float[Array, "B T C"]) -> Float[Array, "B H T T"]:
        """The scaled logits ``[B, H, T, T]`` (symmetric for ``qk="symmetric"``)."""
        q, k, _ = self.project(x)
        k = jnp.broadcast_to(k, q.shape)
        return jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])

    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        _check_x(x, self.in_features)
        return self.out(ops.attention(*self.project(x), mask=self.mask, implementation=self.implementation))


class DiffQKVAttention(nnx.Module):
    r"""DiffQKV attention ("Sigma: Differential Rescaling of Query, Key and Value for Efficient
    Language Models", Lin et al., 2025; :func:`attnjax.ops.diffqkv_attention`).

    Keys and values are compressed differently: ``num_k_heads`` key heads of width ``k_head_dim``
    and ``num_v_heads`` value heads of width ``v_head_dim`` (each count dividing ``num_heads``);
    queries may pass an augmented intermediate ``C -> q_aug_dim -> H k_head_dim`` (our reading of
    the augmented-Q path; ``None`` projects directly); ``value_top_k`` reads only the values of
    each query's highest-scoring keys. Causal by default.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.DiffQKVAttention(4, 16, num_k_heads=1, num_v_heads=2, k_head_dim=2, v_head_dim=4,
    ...                         q_aug_dim=32, value_top_k=4, rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 9, 16))).shape
    (1, 9, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        num_k_heads: int,
        num_v_heads: int,
        k_head_dim: int,
        v_head_dim: int,
        q_aug_dim: int | None = None,
        value_top_k: int | None = None,
        mask: Mask | None = masks.causal(),
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H = _checks.positive_int("num_heads", num_heads)
        C = _checks.positive_int("in_features", in_features)
        Kk, Kv = (
            _checks.positive_int("num_k_heads", num_k_heads),
            _checks.positive_int("num_v_heads", num_v_heads),
        )
        if H % Kk or H % Kv:
            raise ValueError(f"num_k_heads={Kk} and num_v_heads={Kv} must divide num_heads={H}")
        Dk, Dv = (
            _checks.positive_int("k_head_dim", k_head_dim),
            _checks.positive_int("v_head_dim", v_head_dim),
        )
        self.in_features, self.value_top_k = C, value_top_k
        self.mask, self.implementation = check_module_mask(mask), implementation
        lin = lambda n_in, shape, names: nnx.LinearGeneral(
            n_in, shape, use_bias=use_bias, dtype=dtype, rngs=rngs, **projection_axes(*names)
        )
        if q_aug_dim is None:
            self.q_aug = nnx.data(None)
            self.query = lin(C, (H, Dk), ("embed", "heads", "head_dim"))
        else:
            A = _checks.positive_int("q_aug_dim", q_aug_dim)
            self.q_aug = linear(C, A, ("embed", "mlp"), use_bias=use_bias, dtype=dtype, rngs=rngs)
            self.query = lin(A, (H, Dk), ("mlp", "heads", "head_dim"))
        self.key = lin(C, (Kk, Dk), ("embed", "kv_heads", "head_dim"))
        self.value = lin(C, (Kv, Dv), ("embed", "kv_heads", "head_dim"))
        self.out = _out(H, Dv, C, use_bias, dtype, rngs)

    def project(self, x):
        """``(q [B, T, H, Dk], k [B, T, Kk, Dk], v [B, T, Kv, Dv])``."""
        return self.query(x if self.q_aug is None else self.q_aug(x)), self.key(x), self.value(x)

    def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
        _check_x(x, self.in_features)
        o = ops.diffqkv_attention(
            *self.project(x), value_top_k=self.value_top_k, mask=self.mask, implementation=self.implementation
        )
        return self.out(o)


class RoPEAttention(nnx.Module):
    r"""Multi-head attention with rotary position embeddings of a chosen base
    (:func:`attnjax.ops.rope` on queries and keys), the base overridable per call (``base=``, may be
    traced) so that :func:`attnjax.ops.attention_buckets` can run one model under several bases.

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn, ops
    >>> m = nn.RoPEAttention(2, 16, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (1, 9, 16))
    >>> ops.attention_buckets(lambda b: m(x, base=b), [1e4, 2e4]).shape
    (1, 9, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        base: float = 10000.0,
        num_kv_heads: int | None = None,
        mask: Mask | None = masks.causal(),
        use_bias: bool = False,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, qkv = _checks.head_features(num_heads, in_features)
        K = _checks.positive_int("num_kv_heads", num_kv_heads or H)
        if H % K or (qkv // H) % 2:
            raise ValueError(
                f"need num_kv_heads={K} dividing num_heads={H} and an even head dim; got {qkv // H}"
            )
        self.in_features, self.base = C, float(base)
        self.mask, self.implementation = check_module_mask(mask), implementation
        self.query, self.key, self.value, self.out = head_projections(
            C, H, qkv // H, kv_heads=K, use_bias=use_bias, dtype=dtype, rngs=rngs
        )

    def project(self, x, base=None):
        """``(rope(q), rope(k), v)`` with RoPE base ``base`` (default the layer's)."""
        b = self.base if base is None else base
        return ops.rope(self.query(x), b), ops.rope(self.key(x), b), self.value(x)

    def __call__(self, x: Float[Array, "B T C"], *, base=None) -> Float[Array, "B T C"]:
        _check_x(x, self.in_features)
        return self.out(
            ops.attention(*self.project(x, base), mask=self.mask, implementation=self.implementation)
        )
