r"""Selective attention ("Selective Attention: Enhancing Transformer through Principled Context
Control", Zhang et al., NeurIPS 2024).

Selective self-attention (SSA) gives every query its own inverse temperature, from its token and
its position, and scales every value by a token-dependent temperature:

.. math::

    O_i = \sum_j \mathrm{softmax}_j\big(\tau_i\, \mathrm{scale}\; q_i \cdot k_j\big)\, \nu_j v_j,
    \qquad \tau_i = \tau^{q}_i \,\big(1 + \alpha_h \log n_i\big)

* ``tau^q_i`` (``query_temperature``, ``[B, T, H]``) is the token-dependent part: small values
  flatten query ``i``'s attention, large values sharpen it (the paper computes it from the token,
  e.g. ``tanh`` of a linear map sharing the query projection: :class:`attnjax.nn.SelectiveAttention`);
* ``1 + alpha_h log n_i`` is the position-dependent part, ``n_i = pos_i + 1`` the number of keys a
  causal query sees (queries aligned bottom-right, ``pos_i = i + S - T``): the log-length scaling
  that counters the dilution of attention over long contexts;
* ``nu_j`` (``value_temperature``, ``[B, S, K]``) scales value ``j`` (suppresses noisy tokens).

The query temperature is a score mod (:func:`selective_temperature`), so the op is
:func:`attnjax.ops.attention` with that mod and scaled values: every implementation (blockwise
xla, masks, GQA) applies, and the temperatures get gradients through the hand-written backward.
Cost is that of softmax attention, ``O(T S D)`` time, ``O(T)`` memory on the xla path.

Letter legend: B batch, T query length, S key length, H query heads, K key/value heads,
D head dim, E value dim.
"""

from __future__ import annotations


import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.core.pytree import pytree_dataclass
from attnjax.masks import Mask
from attnjax.core import dispatch
from attnjax.ops.attention.api import attention
from attnjax.score_mods import ScoreMod, head_param
from attnjax.core.dispatch import Implementation


def _position_factor(position_scale, h, q_idx, q_len: int, kv_len: int):
    """``1 + alpha_h log(n_i)``, ``n_i = max(pos_i, 0) + 1`` keys seen by a causal query."""
    pos = jnp.maximum(q_idx + (kv_len - q_len), 0).astype(jnp.float32)
    return 1.0 + head_param(position_scale, h) * jnp.log1p(pos)


@pytree_dataclass(data=("query_temperature", "position_scale"))
class SelectiveTemperature(ScoreMod):
    query_temperature: Array  # [B, T, H]
    position_scale: Array | None  # scalar or [H]

    def __call__(self, q_len, kv_len, score, b, h, q_idx, kv_idx):
        # Tile padding may index past the last query; those rows are discarded, so clip.
        tq = self.query_temperature.astype(jnp.float32)[b, jnp.clip(q_idx, 0, q_len - 1), h]
        if self.position_scale is not None:
            tq = tq * _position_factor(self.position_scale, h, q_idx, q_len, kv_len)
        return score * tq

    def check(self, heads):
        shape = jnp.shape(self.query_temperature)
        if len(shape) != 3 or shape[2] != heads:
            raise ValueError(f"query_temperature must have shape [batch, q_len, heads={heads}]; got {shape}")
        if self.position_scale is not None:
            _checks.per_head("position_scale", self.position_scale, heads)


def selective_temperature(
    query_temperature: Float[Array, "B T H"], position_scale: float | Float[Array, "H"] | None = None
) -> ScoreMod:
    """The score mod ``s_ij -> s_ij * tau^q_i * (1 + alpha_h log n_i)`` of selective attention.

    >>> import jax.numpy as jnp
    >>> mod = selective_temperature(jnp.full((1, 3, 1), 2.0), position_scale=1.0)
    >>> q, kv = jnp.arange(3)[None, None, :, None], jnp.zeros((1, 1, 1, 1), int)
    >>> mod(3, 3, jnp.ones((1, 1, 3, 1)), 0, 0, q, kv)[0, 0, :, 0]  # 2 (1 + log n), n = 1, 2, 3
    Array([2.       , 3.3862944, 4.1972246], dtype=float32)
    """
    tq = jnp.asarray(query_temperature)
    _checks.check_rank("query_temperature", tq, ("batch", "q_len", "heads"))
    _checks.check_float("query_temperature", tq)
    alpha = None if position_scale is None else jnp.asarray(position_scale, jnp.float32)
    return SelectiveTemperature(tq, alpha)


def selective_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    *,
    query_temperature: Float[Array, "B T H"],
    position_scale: float | Float[Array, "H"] | None = None,
    value_temperature: Float[Array, "B S K"] | None = None,
    mask: Mask | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    r"""Selective self-attention (see the module docstring for the equation).

    Args:
      q, k, v: as :func:`attnjax.ops.attention` (GQA allowed).
      query_temperature: ``tau^q`` ``[B, T, H]``, per query and head (float, gets gradients).
      position_scale: ``alpha`` (scalar or ``[H]``) of the position factor ``1 + alpha log n_i``;
        None leaves it out.
      value_temperature: ``nu`` ``[B, S, K]`` multiplying each value; None leaves it out.
      mask: an :mod:`attnjax.masks` mask (SSA is used with ``masks.causal()``).
      scale: logit scale, default ``1 / sqrt(D)``.
      implementation: ``"reference"`` (dense: queries and values scaled explicitly, then the
        dense attention), ``"xla"`` / ``"pallas"`` (the temperature as a score mod through the
        blockwise path), ``None`` or a sequence.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import masks, ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 12, 2, 4))
    >>> tq = jax.random.uniform(jax.random.key(1), (1, 12, 2), minval=0.5, maxval=2.0)
    >>> out = ops.selective_attention(q, k, v, query_temperature=tq, position_scale=0.1, mask=masks.causal())
    >>> ref = ops.selective_attention(q, k, v, query_temperature=tq, position_scale=0.1, mask=masks.causal(),
    ...                               implementation="reference")
    >>> bool(jnp.allclose(out, ref, atol=1e-5))
    True
    """
    B, T, S, H, K, D, E = _checks.check_qkv(q, k, v)
    mod = selective_temperature(query_temperature, position_scale)
    _checks.check_dim("query_temperature", mod.query_temperature.shape, 0, B, "batch, as in q")
    _checks.check_dim("query_temperature", mod.query_temperature.shape, 1, T, "q_len, as in q")
    mod.check(H)
    if value_temperature is not None:
        vshape = _checks.check_rank("value_temperature", value_temperature, ("batch", "kv_len", "kv_heads"))
        _checks.check_float("value_temperature", value_temperature)
        if vshape != (B, S, K):
            raise ValueError(f"value_temperature has shape {vshape}; expected [batch={B}, kv_len={S}, kv_heads={K}]")
        v = (v.astype(jnp.float32) * value_temperature.astype(jnp.float32)[..., None]).astype(v.dtype)

    def reference():
        # The temperatures written onto the queries instead of the logits (same product).
        tq = mod.query_temperature.astype(jnp.float32)
        if mod.position_scale is not None:
            heads = jnp.arange(H)[None, :]
            tq = tq * _position_factor(mod.position_scale, heads, jnp.arange(T)[:, None], T, S)[None]
        q_t = (q.astype(jnp.float32) * tq[..., None]).astype(q.dtype)
        return attention(q_t, k, v, mask=mask, scale=scale, implementation="reference")

    def modded(impl):
        return lambda: attention(q, k, v, mask=mask, score_mod=mod, scale=scale, implementation=impl)

    impls = {"reference": reference, "xla": modded("xla"), "pallas": modded("pallas")}
    return dispatch.run("selective_attention", impls, implementation)
