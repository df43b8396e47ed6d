"""Multi-head attention in flax.nnx: projections and a KV cache around any attnjax op.

Letter legend: B batch, T query length, S key length, H query heads, K key/value heads,
D head dim, C model features.
"""

from __future__ import annotations

import inspect

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, masks, ops
from attnjax.masks import Mask
from attnjax.nn.layers import OutputGate, QKNorm, projection_axes


def check_module_mask(mask) -> Mask | None:
    """A mask stored on a module must be array-free (static); array masks go in the call."""
    if mask is None:
        return None
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be an attnjax.masks mask or None; got {type(mask).__name__}")
    if jax.tree.leaves(mask):
        raise ValueError(
            f"mask {type(mask).__name__} holds arrays (segment ids, lengths), which a module cannot keep as a "
            "static setting; pass it on each call instead: module(x, mask=...)"
        )
    return mask


def combine_masks(*ms: Mask | None) -> Mask | None:
    """``m1 & m2 & ...`` over the masks that are not None (None if all are)."""
    out = None
    for m in ms:
        if m is not None:
            out = m if out is None else out & m
    return out


class MultiHeadAttention(nnx.Module):
    r"""Multi-head (and grouped-query) attention whose math is an attnjax op.

    .. math::

        y = \mathrm{attention\_fn}(x W_Q,\ c W_K,\ c W_V,\ \mathrm{mask})\, W_O

    with ``c = x`` (self attention) or a ``context`` (cross attention). The module only holds
    parameters and the decode cache; ``attention_fn`` (any callable
    ``(q [B,T,H,D], k [B,S,K,D], v [B,S,K,D], *, mask=None) -> [B,T,H,D]``, default
    :func:`attnjax.ops.attention`; use ``functools.partial`` to fix its options) does the
    attention.

    Args:
      num_heads: query heads ``H``.
      in_features: input features ``C``.
      num_kv_heads: key/value heads ``K`` (divides ``H``; default ``H``).
      qkv_features: ``H * D`` (default ``C``).
      out_features: output features (default ``C``).
      attention_fn: the attention op.
      mask: an :mod:`attnjax.masks` mask applied on every call (bottom-right aligned); a
        per-call ``mask=`` is combined with it by ``&``. Masks holding arrays (``document``)
        belong in the call, not here.
      qk_norm: RMS-normalize queries and keys over the head dim (:class:`QKNorm`).
      output_gate: gate each head's output by ``sigmoid(x W_g)`` (:class:`OutputGate`).
      use_bias: biases in the q/k/v/out projections.

    **Decoding.** :meth:`init_cache` allocates a KV cache of ``max_length`` slots; each
    ``__call__(x, decode=True)`` appends the ``T_new`` new tokens' keys and values (prefill with
    ``T_new > 1``, then one token per step) and attends over the cached ones. The cache keeps the
    newest tokens at its *end*, so the new queries are the last ``T_new`` positions of the
    ``S = max_length`` keys: exactly the bottom-right alignment of :func:`attnjax.masks.causal`
    with ``T != S``; empty slots at the front are masked out. The result equals the full forward
    for masks that depend only on relative position (``causal``, ``sliding_window``), whose
    meaning does not change when positions shift. Tokens beyond ``max_length`` fall off the
    front (a sliding window of ``max_length``). Each step shifts the cache by ``T_new`` slots (a
    copy of ``O(max_length)``, the same order as attending over it). Sigmoid attention's default bias
    ``-log S`` depends on ``S`` (``max_length`` while decoding): fix ``sigmoid_bias`` (e.g.
    ``functools.partial(ops.sigmoid_attention, sigmoid_bias=-math.log(n))``) so that decode
    and the full forward agree.

    A *recurrent* ``attention_fn`` (one taking ``initial_state`` and ``return_final_state``, such
    as ``functools.partial(ops.lightning_attention, log_decay=...)``) decodes with its state
    instead: :meth:`init_cache` allocates a float32 ``[B, H, D, D]`` state that never grows, and
    each decode call runs the op from it and keeps the final state.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from attnjax import masks, nn
    >>> mha = nn.MultiHeadAttention(4, 32, num_kv_heads=2, mask=masks.causal(), rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    >>> full = mha(x)
    >>> mha.init_cache(batch_size=2, max_length=8)
    >>> steps = [mha(x[:, :4], decode=True)] + [mha(x[:, t:t + 1], decode=True) for t in (4, 5)]
    >>> bool(jnp.allclose(full, jnp.concatenate(steps, axis=1), atol=1e-5))
    True
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        num_kv_heads: int | None = None,
        qkv_features: int | None = None,
        out_features: int | None = None,
        attention_fn: Callable[..., Array] = ops.attention,
        mask: Mask | None = None,
        qk_norm: bool = False,
        output_gate: bool = False,
        use_bias: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_heads = _checks.positive_int("num_heads", num_heads)
        self.in_features = _checks.positive_int("in_features", in_features)
        self.num_kv_heads = _checks.positive_int("num_kv_heads", num_kv_heads or num_heads)
        qkv_features = _checks.positive_int("qkv_features", qkv_features or in_features)
        self.out_features = _checks.positive_int("out_features", out_features or in_features)
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={num_heads}")
        if qkv_features % num_heads:
            raise ValueError(f"qkv_features={qkv_features} must be divisible by num_heads={num_heads}")
        mask = check_module_mask(mask)
        if not callable(attention_fn):
            raise TypeError(f"attention_fn must be callable; got {attention_fn!r}")
        self.head_dim = qkv_features // num_heads
        self.attention_fn = attention_fn
        self.mask = mask
        H, K, D = num_heads, self.num_kv_heads, self.head_dim
        lin = lambda out, heads: nnx.LinearGeneral(
            in_features, out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            **projection_axes("embed", heads, "head_dim"),  # logical axes: attnjax.nn.sharding
        )
        self.query, self.key, self.value = lin((H, D), "heads"), lin((K, D), "kv_heads"), lin((K, D), "kv_heads")
        self.qk_norm = QKNorm(D, rngs=rngs) if qk_norm else nnx.data(None)
        self.gate = OutputGate(in_features, H, D, dtype=dtype, rngs=rngs) if output_gate else nnx.data(None)
        self.out = nnx.LinearGeneral(
            (H, D), self.out_features, axis=(-2, -1), use_bias=use_bias, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs, **projection_axes("heads", "head_dim", "embed", inputs=2),
        )
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_length: nnx.Cache | None = nnx.data(None)
        self.recurrent_state: nnx.Cache | None = nnx.data(None)

    # -- pieces (public so tests and users can recompose the module) ----------------------------

    def project(
        self, x: Float[Array, "B T C"], context: Float[Array, "B S C"] | None = None
    ) -> tuple[Float[Array, "B T H D"], Float[Array, "B S K D"], Float[Array, "B S K D"]]:
        """``(q, k, v)`` after projection (and QK-norm)."""
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [batch, seq, in_features={self.in_features}]; got {x.shape}")
        c = x if context is None else context
        if c.ndim != 3 or c.shape[-1] != self.in_features:
            raise ValueError(f"context must have shape [batch, seq, in_features={self.in_features}]; got {c.shape}")
        q, k, v = self.query(x), self.key(c), self.value(c)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        return q, k, v

    def attend(self, q, k, v, mask: Mask | None) -> Float[Array, "B T H D"]:
        """``attention_fn(q, k, v, mask=mask)`` (``mask`` left out when None)."""
        return self.attention_fn(q, k, v) if mask is None else self.attention_fn(q, k, v, mask=mask)

    def finish(self, x: Float[Array, "B T C"], o: Float[Array, "B T H D"]) -> Float[Array, "B T C"]:
        """Output gate (if any) and output projection."""
        if self.gate is not None:
            o = self.gate(x, o)
        return self.out(o)

    # -- forward ------------------------------------------------------------------------------------

    def __call__(
        self,
        x: Float[Array, "B T C"],
        context: Float[Array, "B S C"] | None = None,
        *,
        mask: Mask | None = None,
        decode: bool = False,
    ) -> Float[Array, "B T C"]:
        """Attends from ``x`` to ``context`` (default ``x``); see the class docstring."""
        q, k, v = self.project(x, context)
        mask = combine_masks(self.mask, mask)
        if decode:
            if context is not None:
                raise ValueError("decode=True caches self-attention keys; cross attention needs no cache")
            if self._recurrent:
                return self.finish(x, self._advance_state(q, k, v, mask))
            k, v, mask = self._extend_cache(k, v, mask)
        return self.finish(x, self.attend(q, k, v, mask))

    # -- decoding --------------------------------------------------------------------------------
    #
    # Softmax and sigmoid attention decode with a KV cache. Recurrent ops (those taking
    # ``initial_state`` and ``return_final_state``, e.g. ``attnjax.ops.lightning_attention``)
    # decode with a fixed-size float32 state ``[B, H, D, E]`` instead, advanced by the op itself:
    # prefill and every step are the same call, so decode equals the full forward by construction
    # of the op's chunked recurrence.

    @property
    def _recurrent(self) -> bool:
        try:
            params = inspect.signature(self.attention_fn).parameters
        except (TypeError, ValueError):
            return False
        return "initial_state" in params and "return_final_state" in params

    def init_cache(self, batch_size: int, max_length: int | None = None, dtype=jnp.float32) -> None:
        """Allocates the decode cache: a KV cache of ``max_length`` positions
        (``[B, max_length, K, D]``), or for a recurrent ``attention_fn`` its state
        ``[B, H, D, D]`` (``max_length`` is then unused: the state does not grow)."""
        B = _checks.positive_int("batch_size", batch_size)
        if self._recurrent:
            D = self.head_dim
            self.recurrent_state = nnx.Cache(jnp.zeros((B, self.num_heads, D, D), jnp.float32))
            return
        if max_length is None:
            raise ValueError("init_cache needs max_length for a KV cache")
        S = _checks.positive_int("max_length", max_length)
        shape = (B, S, self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_length = nnx.Cache(jnp.zeros((), jnp.int32))

    def _advance_state(self, q, k, v, mask):
        if self.recurrent_state is None:
            raise ValueError("decode=True needs a state: call init_cache(batch_size) first")
        if mask is not None:
            raise ValueError("a recurrent attention_fn is causal by construction and takes no mask")
        state = self.recurrent_state[...]
        if q.shape[0] != state.shape[0]:
            raise ValueError(f"the state was made for batch_size={state.shape[0]}; got a batch of {q.shape[0]}")
        out, state = self.attention_fn(q, k, v, initial_state=state, return_final_state=True)
        self.recurrent_state[...] = state
        return out

    def _extend_cache(self, k, v, mask):
        if self.cached_key is None:
            raise ValueError("decode=True needs a cache: call init_cache(batch_size, max_length) first")
        ck, cv = self.cached_key[...], self.cached_value[...]
        B, S = ck.shape[:2]
        t = k.shape[1]
        if k.shape[0] != B:
            raise ValueError(f"the cache was made for batch_size={B}; got a batch of {k.shape[0]}")
        if t > S:
            raise ValueError(f"{t} new tokens do not fit a cache of max_length={S}")
        # Newest tokens at the end: shift out the t oldest slots and append.
        ck = jnp.concatenate([ck[:, t:], k.astype(ck.dtype)], axis=1)
        cv = jnp.concatenate([cv[:, t:], v.astype(cv.dtype)], axis=1)
        length = jnp.minimum(self.cache_length[...] + t, S)
        self.cached_key[...], self.cached_value[...], self.cache_length[...] = ck, cv, length
        # Slots before S - length are still empty: keys there are masked out.
        filled = ~masks.KeyPrefix(S - length)
        return ck.astype(k.dtype), cv.astype(v.dtype), combine_masks(mask, filled)
