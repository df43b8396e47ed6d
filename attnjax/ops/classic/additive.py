r"""Additive (Bahdanau / content-based) attention and HAN context-vector pooling.

"Neural Machine Translation by Jointly Learning to Align and Translate" (Bahdanau et al., 2014):

.. math::

    e_{ij} = w_h^\top \phi(W q_i + U k_j + b), \qquad
    \alpha_{ij} = \mathrm{softmax}_j\, e_{ij}, \qquad c_i = \sum_j \alpha_{ij} v_j

with ``phi = tanh``. The first layer is split: ``a_i = W q_i + b`` and ``c_j = U k_j`` are
computed once (``O((T + S) P)``), and the tanh and the ``w``-dot run per tile inside the blockwise
path (a pairwise score function, zoo primitive C3), so neither the ``[T, S]`` scores nor the
``[T, S, P]`` hidden activations ever exist. GATv2's score is the same computation with
``phi = LeakyReLU`` (:mod:`attnjax.ops.classic.gat`).

Context-vector pooling (hierarchical attention networks): ``u_j = tanh(W h_j + b)``,
``alpha_j = softmax_j(u_j . u_ctx)``, ``s = sum_j alpha_j h_j`` is plain attention with one
learned query, :func:`context_pooling`.

Letter legend: B batch, T queries, S keys, H heads, K key/value heads, P hidden size, E value dim.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks, score_mods
from attnjax.core import dispatch
from attnjax.core.blocks import BlockSizes
from attnjax.core.dispatch import Implementation
from attnjax.masks import Mask
from attnjax.ops.attention.api import attention

Activation = str | Callable[[Array], Array]


def activation_fn(activation: Activation, negative_slope: float = 0.2) -> Callable[[Array], Array]:
    """``"tanh"``, ``"leaky_relu"`` (with ``negative_slope``), ``"relu"`` or a callable."""
    if callable(activation):
        return activation
    if activation == "tanh":
        return jnp.tanh
    if activation == "relu":
        return jax.nn.relu
    if activation == "leaky_relu":
        return lambda x: jax.nn.leaky_relu(x, negative_slope)
    raise ValueError(f"activation must be 'tanh', 'relu', 'leaky_relu' or a callable; got {activation!r}")


def _check(q_feats, k_feats, v, w):
    B, T, H, P = _checks.check_rank("q_feats", q_feats, ("batch", "q_len", "heads", "hidden"))
    kshape = _checks.check_rank("k_feats", k_feats, ("batch", "kv_len", "kv_heads", "hidden"))
    vshape = _checks.check_rank("v", v, ("batch", "kv_len", "kv_heads", "v_head_dim"))
    for name, x in (("q_feats", q_feats), ("k_feats", k_feats), ("v", v), ("w", w)):
        _checks.check_float(name, x)
    if kshape[0] != B or kshape[3] != P:
        raise ValueError(
            f"k_feats {kshape} must be [batch={B}, kv_len, kv_heads, hidden={P}] (q_feats {q_feats.shape})"
        )
    if vshape[:3] != kshape[:3]:
        raise ValueError(f"v {vshape} must match k_feats {kshape} on [batch, kv_len, kv_heads]")
    if H % kshape[2]:
        raise ValueError(f"k_feats has {kshape[2]} heads, which must divide the {H} heads of q_feats")
    if jnp.shape(w) != (H, P):
        raise ValueError(f"w must have shape [heads={H}, hidden={P}]; got {jnp.shape(w)}")
    return B, T, kshape[1], H, kshape[2], P


def additive_scores(q_feats, k_feats, w, activation: Activation = "tanh", negative_slope: float = 0.2):
    """The dense scores ``e [B, H, T, S]`` (``O(T S P)`` memory: for references and small problems)."""
    act = activation_fn(activation, negative_slope)
    H, K = q_feats.shape[2], k_feats.shape[2]
    kf = jnp.repeat(k_feats.astype(jnp.float32), H // K, axis=2)
    hidden = act(q_feats.astype(jnp.float32)[:, :, None] + kf[:, None])  # [B, T, S, H, P]
    return jnp.einsum("btshp,hp->bhts", hidden, w.astype(jnp.float32), precision="highest")


def additive_score_mod(q_feats, k_feats, w, activation: Activation = "tanh", negative_slope: float = 0.2):
    """The scores as a score mod evaluated tile by tile (C3): added to the incoming score."""
    act = activation_fn(activation, negative_slope)
    T, S = q_feats.shape[1], k_feats.shape[1]
    group = q_feats.shape[2] // k_feats.shape[2]

    def fn(params, score, b, h, q_idx, kv_idx):
        qf, kf, ww = (x.astype(jnp.float32) for x in params)
        # [B, H, t, 1, P] and [B, H, 1, s, P]; tile padding indexes past the end, so clip
        qt = qf[b, jnp.clip(q_idx, 0, T - 1), h]
        kt = kf[b, jnp.clip(kv_idx, 0, S - 1), h // group]
        return score + (act(qt + kt) * ww[h]).sum(-1)

    return score_mods.from_fn(fn, (q_feats, k_feats, w))


def additive_attention(
    q_feats: Float[Array, "B T H P"],
    k_feats: Float[Array, "B S K P"],
    value: Float[Array, "B S K E"],
    w: Float[Array, "H P"],
    *,
    activation: Activation = "tanh",
    negative_slope: float = 0.2,
    mask: Mask | None = None,
    implementation: Implementation = None,
    block_sizes: BlockSizes | None = None,
    return_lse: bool = False,
) -> Float[Array, "B T H E"] | tuple[Float[Array, "B T H E"], Float[Array, "B T H"]]:
    r"""Additive attention ``softmax_j(w_h . phi(a_i + c_j)) v_j`` (module docstring).

    Args:
      q_feats: ``a_i = W q_i + b``, ``[B, T, H, P]`` (the bias folded in here).
      k_feats: ``c_j = U k_j``, ``[B, S, K, P]`` (``K`` divides ``H``; query head ``h`` uses
        key head ``h // (H // K)``).
      value: ``[B, S, K, E]`` (the classic form passes the keys themselves).
      w: the output vector per head, ``[H, P]``.
      activation: ``"tanh"`` (Bahdanau), ``"leaky_relu"`` (GATv2), ``"relu"`` or a callable.
      mask: an :mod:`attnjax.masks` mask (padding, an adjacency, ...).
      implementation: ``"reference"`` (dense ``[T, S, P]`` scores as a bias of ``ops.attention``)
        or ``"xla"`` (the scores per tile inside ``ops.attention``'s blockwise path).
      return_lse: also return the float32 log-sum-exp of each row's scores ``[B, T, H]``, to merge
        with other keys (the visual sentinel, :mod:`attnjax.ops.classic.sentinel`).

    Returns ``[B, T, H, E]`` in ``value.dtype``; every input gets gradients.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> a = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    >>> c = v = jax.random.normal(jax.random.key(1), (1, 7, 2, 8))
    >>> ops.additive_attention(a, c, v, jnp.ones((2, 8))).shape
    (1, 5, 2, 8)
    """
    B, T, S, H, K, _ = _check(q_feats, k_feats, value, w)
    # q . k is switched off: one zero feature, scale 1; the scores come from the bias or the mod
    zq, zk = jnp.zeros((B, T, H, 1), value.dtype), jnp.zeros((B, S, K, 1), value.dtype)
    common = dict(scale=1.0, mask=mask, return_lse=return_lse)

    def reference():
        bias = additive_scores(q_feats, k_feats, w, activation, negative_slope)
        return attention(zq, zk, value, bias, implementation="reference", **common)

    def xla():
        mod = additive_score_mod(q_feats, k_feats, w, activation, negative_slope)
        return attention(
            zq, zk, value, score_mod=mod, implementation="xla", block_sizes=block_sizes, **common
        )

    return dispatch.run("additive_attention", {"reference": reference, "xla": xla}, implementation)


def context_pooling(
    h: Float[Array, "B S C"],
    keys: Float[Array, "B S P"],
    u_ctx: Float[Array, " P"],
    *,
    mask: Mask | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B C"]:
    r"""HAN context-vector pooling: ``s = sum_j softmax_j(u_j . u_ctx) h_j`` with ``u_j`` =
    ``keys`` (the caller's ``tanh(W h_j + b)``) and a learned context vector ``u_ctx`` (one query,
    scale 1, through ``ops.attention``).

    >>> import jax, jax.numpy as jnp
    >>> h = jnp.arange(6.0).reshape(1, 3, 2)
    >>> context_pooling(h, jnp.zeros((1, 3, 4)), jnp.ones(4))          # equal scores: the mean
    Array([[2., 3.]], dtype=float32)
    """
    B, S, _ = _checks.check_rank("h", h, ("batch", "len", "features"))
    _checks.check_rank("keys", keys, ("batch", "len", "hidden"))
    if keys.shape[:2] != (B, S) or jnp.shape(u_ctx) != keys.shape[-1:]:
        raise ValueError(
            f"keys must be [batch={B}, len={S}, P] and u_ctx [P]; got {keys.shape} and {jnp.shape(u_ctx)}"
        )
    q = jnp.broadcast_to(jnp.asarray(u_ctx, keys.dtype), (B, 1, 1, keys.shape[-1]))
    out = attention(
        q,
        keys[:, :, None],
        h[:, :, None].astype(keys.dtype),
        scale=1.0,
        mask=mask,
        implementation=implementation,
    )
    return out[:, 0, 0].astype(h.dtype)
