"""Multi-head attention in flax.nnx: projections and a KV cache around any attnjax op, with
the arguments, parameter names and behaviour of ``flax.nnx.MultiHeadAttention``.

Letter legend: B batch, T query length, S key length, H query heads, K key/value heads,
D head dim, C model features.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from jaxtyping import Array, Bool, Float

from attnjax import _checks, masks, ops
from attnjax.masks import Mask
from attnjax.nn import sharding
from attnjax.nn.layers import OutputGate, QKNorm, projection_axes

default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()
_EMPTY: Mapping[str, Any] = MappingProxyType({})


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
    r"""Multi-head (and grouped-query) attention whose math is an attnjax op; a drop-in for
    ``flax.nnx.MultiHeadAttention``.

    .. math::

        y = \mathrm{attention\_fn}(x_q W_Q,\ x_k W_K,\ x_v W_V,\ \mathrm{mask})\, W_O

    Flax's arguments keep their names, positions and meanings, and the parameters their names
    and shapes (``query``, ``key``, ``value``, ``out`` :class:`flax.nnx.LinearGeneral`, and
    ``query_ln``/``key_ln`` with ``normalize_qk``), so a Flax model's state loads with
    ``nnx.update(ours, nnx.state(theirs))`` and gives the same outputs. The module only holds
    parameters and the decode cache; ``attention_fn`` (any callable
    ``(q [B,T,H,D], k [B,S,K,D], v [B,S,K,D], *, mask=None) -> [B,T,H,D]``, default
    :func:`attnjax.ops.attention`; use ``functools.partial`` to fix its options) does the
    attention: any attnjax op, not only softmax. Differences from Flax: a query with no allowed
    key gives zeros (Flax: the mean of the values); ``is_causal`` is aligned bottom-right (the
    same as Flax's when ``T == S``) and is honoured while decoding; dropout drops each
    ``(b, h, q, kv)`` weight independently (``broadcast_dropout`` is accepted and ignored) and
    draws other random numbers than Flax; ``precision`` applies to the projections (attnjax ops
    accumulate in float32); ``sow_weights`` and ``input_positions`` are not supported.

    Args:
      num_heads: query heads ``H``.
      in_features: query input features ``C``.
      qkv_features: ``H * D`` (default ``C``).
      out_features: output features (default ``C``).
      num_kv_heads: key/value heads ``K`` (divides ``H``; default ``H``): grouped-query attention.
      in_kv_features: key/value input features (default ``C``).
      dtype: computation dtype of the projections (default: inferred from inputs and params).
      param_dtype: parameter dtype.
      broadcast_dropout: accepted for Flax compatibility; attnjax never shares dropout patterns.
      dropout_rate: attention-weight dropout, passed to ``attention_fn`` as ``dropout_rate`` and
        ``dropout_key`` (it must take them) unless ``deterministic``.
      deterministic: default for the call's ``deterministic`` (needed when ``dropout_rate > 0``).
      precision: ``jax.lax.Precision`` of the projections.
      kernel_init, out_kernel_init, bias_init, out_bias_init: initializers of the projections
        (``out_*`` default to the others).
      use_bias: biases in the q/k/v/out projections.
      attention_fn: the attention op.
      decode: default for the call's ``decode``.
      normalize_qk: LayerNorm (no bias) on queries and keys over the head dim, as Flax
        (ViT-22B); parameters ``query_ln`` and ``key_ln``.
      mask: (attnjax) an :mod:`attnjax.masks` mask applied on every call (bottom-right
        aligned); combined by ``&`` with the call's ``mask`` and ``is_causal``. Masks holding
        arrays (``document``) belong in the call, not here.
      qk_norm: (attnjax) RMS-normalize queries and keys over the head dim instead
        (:class:`attnjax.nn.layers.QKNorm`, parameter ``qk_norm``).
      output_gate: (attnjax) gate each head's output by ``sigmoid(x W_g)``
        (:class:`attnjax.nn.layers.OutputGate`, parameter ``gate``).
      rngs: parameter initialization and (``rngs.dropout``) dropout randomness.
      keep_rngs: keep a fork of ``rngs.dropout`` for dropout (as Flax).
      kernel_metadata: variable metadata of the projections' kernels, as Flax (likewise
        ``out_kernel_metadata``, ``bias_metadata``, ``out_bias_metadata``,
        ``query_ln_scale_metadata``, ``key_ln_scale_metadata``); by default the library's logical
        axes (:mod:`attnjax.nn.sharding`).

    **Calling.** ``mha(inputs_q, inputs_k=None, inputs_v=None, *, mask=None, ...)`` takes
    ``[batch..., length, features]`` inputs (``inputs_k`` defaults to ``inputs_q``, ``inputs_v``
    to ``inputs_k``). ``mask`` is an :mod:`attnjax.masks` mask or, as in Flax, an array
    broadcastable to ``[batch..., H, T, S]`` (nonzero or ``True`` = attend, e.g. from
    ``nnx.make_attention_mask``).

    **Decoding.** :meth:`init_cache` allocates a KV cache, Flax's way (``init_cache(input_shape)``
    with ``input_shape = (batch..., max_length, features)``) or by size
    (``init_cache(batch_size=B, max_length=S)``); each call with ``decode=True`` appends the
    ``T_new`` new tokens' keys and values (prefill with ``T_new > 1``, then one token per step, or
    one token at a time from the start as Flax) and attends over the cached ones. The cache keeps
    the newest tokens at its *end*, so the new queries are the last ``T_new`` positions of the
    ``S = max_length`` keys: exactly the bottom-right alignment of :func:`attnjax.masks.causal`
    with ``T != S``; empty slots at the front are masked out, and a boolean array ``mask`` is read
    as Flax's (its key axis indexes absolute positions ``0 .. max_length - 1``). The result equals
    the full forward for masks that depend only on relative position (``causal``,
    ``sliding_window``), whose meaning does not change when positions shift. Tokens beyond
    ``max_length`` fall off the front (a sliding window of ``max_length``). ``cache_index``
    counts the tokens seen. Each step shifts the cache by ``T_new`` slots (a copy of
    ``O(max_length)``, the same order as attending over it). Sigmoid attention's default bias
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

    Flax's parameters load as they are:

    >>> theirs = nnx.MultiHeadAttention(4, 32, decode=False, rngs=nnx.Rngs(5))
    >>> ours = nn.MultiHeadAttention(4, 32, rngs=nnx.Rngs(6))
    >>> nnx.update(ours, nnx.state(theirs, nnx.Param))
    >>> bool(jnp.allclose(ours(x, is_causal=True), theirs(x, is_causal=True), atol=1e-5))
    True
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision=None,
        kernel_init=default_kernel_init,
        out_kernel_init=None,
        bias_init=default_bias_init,
        out_bias_init=None,
        use_bias: bool = True,
        attention_fn: Callable[..., Array] = ops.attention,
        decode: bool | None = None,
        normalize_qk: bool = False,
        mask: Mask | None = None,
        qk_norm: bool = False,
        output_gate: bool = False,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
        kernel_metadata: Mapping[str, Any] = _EMPTY,
        out_kernel_metadata: Mapping[str, Any] = _EMPTY,
        bias_metadata: Mapping[str, Any] = _EMPTY,
        out_bias_metadata: Mapping[str, Any] = _EMPTY,
        query_ln_scale_metadata: Mapping[str, Any] = _EMPTY,
        key_ln_scale_metadata: Mapping[str, Any] = _EMPTY,
    ):
        self.num_heads = _checks.positive_int("num_heads", num_heads)
        self.in_features = _checks.positive_int("in_features", in_features)
        self.qkv_features = _checks.positive_int("qkv_features", qkv_features or in_features)
        self.out_features = _checks.positive_int("out_features", out_features or in_features)
        self.in_kv_features = _checks.positive_int("in_kv_features", in_kv_features or in_features)
        self.num_kv_heads = _checks.positive_int("num_kv_heads", num_kv_heads or num_heads)
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={num_heads}")
        if self.qkv_features % num_heads:
            raise ValueError(f"qkv_features={self.qkv_features} must be divisible by num_heads={num_heads}")
        if normalize_qk and qk_norm:
            raise ValueError("normalize_qk (Flax's LayerNorm) and qk_norm (RMS norm) exclude each other")
        if not callable(attention_fn):
            raise TypeError(f"attention_fn must be callable; got {attention_fn!r}")
        self.dropout_rate = float(dropout_rate)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1); got {dropout_rate}")
        if self.dropout_rate > 0 and not {"dropout_rate", "dropout_key"} <= _parameters(attention_fn):
            raise ValueError(
                f"dropout_rate={dropout_rate} needs an attention_fn taking dropout_rate and dropout_key "
                f"(attnjax.ops.attention does); {getattr(attention_fn, '__name__', attention_fn)!r} does not"
            )
        self.head_dim = self.qkv_features // num_heads
        self.attention_fn = attention_fn
        self.mask = check_module_mask(mask)
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        self.broadcast_dropout, self.deterministic, self.decode = broadcast_dropout, deterministic, decode
        self.use_bias, self.normalize_qk = use_bias, normalize_qk
        H, K, D = num_heads, self.num_kv_heads, self.head_dim

        def linear(in_features, out_features, **kw):
            return nnx.LinearGeneral(
                in_features,
                out_features,
                dtype=dtype,
                param_dtype=param_dtype,
                use_bias=use_bias,
                precision=precision,
                rngs=rngs,
                **kw,
            )

        def axes(library: dict, kernel: Mapping[str, Any], bias: Mapping[str, Any]) -> dict:
            """A caller's Flax metadata, else the library's logical axes (attnjax.nn.sharding)."""
            return {"kernel_metadata": kernel or library["kernel_metadata"], "bias_metadata": bias or library["bias_metadata"]}

        init = dict(kernel_init=kernel_init, bias_init=bias_init)
        # Flax's order of creation, so that one seed gives Flax's initial parameters.
        self.query = linear(
            self.in_features, (H, D), **init,
            **axes(projection_axes("embed", "heads", "head_dim"), kernel_metadata, bias_metadata),
        )
        kv = axes(projection_axes("embed", "kv_heads", "head_dim"), kernel_metadata, bias_metadata)
        self.key = linear(self.in_kv_features, (K, D), **init, **kv)
        self.value = linear(self.in_kv_features, (K, D), **init, **kv)
        if normalize_qk:
            ln = lambda meta: nnx.LayerNorm(
                D, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                scale_metadata=meta or sharding.axes("head_dim"),
            )
            self.query_ln, self.key_ln = ln(query_ln_scale_metadata), ln(key_ln_scale_metadata)
        else:
            self.query_ln, self.key_ln = nnx.data(None), nnx.data(None)
        self.qk_norm = QKNorm(D, rngs=rngs) if qk_norm else nnx.data(None)
        self.gate = OutputGate(in_features, H, D, dtype=dtype, rngs=rngs) if output_gate else nnx.data(None)
        self.out = linear(
            (H, D),
            self.out_features,
            axis=(-2, -1),
            kernel_init=out_kernel_init or kernel_init,
            bias_init=out_bias_init or bias_init,
            **axes(
                projection_axes("heads", "head_dim", "embed", inputs=2),
                out_kernel_metadata or kernel_metadata,
                out_bias_metadata or bias_metadata,
            ),
        )
        self.rngs = rngs.dropout.fork() if keep_rngs and self.dropout_rate > 0 else None
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)
        self.recurrent_state: nnx.Cache | None = nnx.data(None)

    # -- pieces (public so tests and users can recompose the module) ----------------------------

    def project(
        self,
        inputs_q: Float[Array, "B T C"],
        inputs_k: Float[Array, "B S C"] | None = None,
        inputs_v: Float[Array, "B S C"] | None = None,
        *,
        qkv_sharding=None,
    ) -> tuple[Float[Array, "B T H D"], Float[Array, "B S K D"], Float[Array, "B S K D"]]:
        """``(q, k, v)`` after projection and QK normalization (``inputs_k`` defaults to
        ``inputs_q``, ``inputs_v`` to ``inputs_k``)."""
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError(
                    "inputs_k cannot be None when inputs_v is given (pass the same array to inputs_k)"
                )
            inputs_k = inputs_q
        inputs_v = inputs_k if inputs_v is None else inputs_v
        for name, x, c in (
            ("inputs_q", inputs_q, self.in_features),
            ("inputs_k", inputs_k, self.in_kv_features),
            ("inputs_v", inputs_v, self.in_kv_features),
        ):
            if getattr(x, "ndim", 0) < 2 or x.shape[-1] != c:
                raise ValueError(
                    f"{name} must have shape [batch..., length, in_features={c}]; "
                    f"got {getattr(x, 'shape', type(x).__name__)}"
                )
        kw = {} if qkv_sharding is None else dict(out_sharding=qkv_sharding)
        q, k, v = self.query(inputs_q, **kw), self.key(inputs_k, **kw), self.value(inputs_v, **kw)
        if self.query_ln is not None:
            q, k = self.query_ln(q), self.key_ln(k)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        return q, k, v

    def attend(self, q, k, v, mask: Mask | None, **kwargs) -> Float[Array, "B T H D"]:
        """``attention_fn(q, k, v, mask=mask, **kwargs)`` (``mask`` left out when None)."""
        if mask is not None:
            kwargs["mask"] = mask
        return self.attention_fn(q, k, v, **kwargs)

    def finish(
        self, x: Float[Array, "B T C"], o: Float[Array, "B T H D"], *, out_sharding=None
    ) -> Float[Array, "B T C"]:
        """Output gate (if any) and output projection."""
        if self.gate is not None:
            o = self.gate(x, o)
        return self.out(o) if out_sharding is None else self.out(o, out_sharding=out_sharding)

    # -- forward ------------------------------------------------------------------------------------

    def __call__(
        self,
        inputs_q: Float[Array, "*B T C"],
        inputs_k: Float[Array, "*B S C"] | None = None,
        inputs_v: Float[Array, "*B S C"] | None = None,
        *,
        mask: Mask | Bool[Array, "*#B #H #T #S"] | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        sow_weights: bool = False,
        decode: bool | None = None,
        is_causal: bool = False,
        out_sharding=None,
        qkv_sharding=None,
        input_positions: Array | None = None,
    ) -> Float[Array, "*B T O"]:
        """Attends from ``inputs_q`` to ``inputs_k``/``inputs_v`` (default ``inputs_q``); see the
        class docstring. ``deterministic``, ``rngs`` and ``decode`` override the constructor's."""
        if sow_weights:
            raise NotImplementedError(
                "sow_weights: attnjax ops never form the attention weights "
                "(attnjax.analysis computes them from q and k)"
            )
        if input_positions is not None:
            raise NotImplementedError("input_positions (RoPE inside attention_fn) is not supported")
        decode = _first(decode, self.decode, False)
        if decode and inputs_k is not None and inputs_k is not inputs_q:
            raise ValueError("decode=True caches self-attention keys; cross attention needs no cache")
        batch = inputs_q.shape[:-2]
        flat = lambda x: None if x is None else x.reshape((math.prod(x.shape[:-2]), *x.shape[-2:]))
        x = flat(inputs_q)
        q, k, v = self.project(x, flat(inputs_k), flat(inputs_v), qkv_sharding=qkv_sharding)
        kwargs = self._dropout(deterministic, rngs)
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a Python bool; got {type(is_causal).__name__}")
        base = combine_masks(self.mask, masks.causal() if is_causal else None)
        if decode and self._recurrent:
            if mask is not None or base is not None:
                raise ValueError("a recurrent attention_fn is causal by construction and takes no mask")
            o = self._advance_state(q, k, v, kwargs)
        else:
            arrays = None if mask is None or isinstance(mask, Mask) else mask
            call_mask = mask if arrays is None else None
            if decode:
                k, v, filled, seen = self._extend_cache(k, v)
                extra = (
                    filled if arrays is None else filled & self._array_mask(arrays, batch, q, k, roll=seen)
                )
            else:
                extra = None if arrays is None else self._array_mask(arrays, batch, q, k)
            o = self.attend(q, k, v, combine_masks(base, call_mask, extra), **kwargs)
        y = self.finish(x, o, out_sharding=out_sharding)
        return y.reshape((*batch, *y.shape[1:]))

    def _dropout(self, deterministic, rngs) -> dict:
        """The ``dropout_rate``/``dropout_key`` keywords of the op (none when deterministic)."""
        if self.dropout_rate == 0.0:
            return {}
        deterministic = _first(deterministic, self.deterministic, None)
        if deterministic is None:
            raise ValueError("dropout_rate > 0 needs deterministic= (in the call or the constructor)")
        if deterministic:
            return {}
        stream = rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs if rngs is not None else self.rngs
        if stream is None:
            raise ValueError(
                "dropout needs rngs: pass rngs= to the call (the module was built with keep_rngs=False)"
            )
        return dict(dropout_rate=self.dropout_rate, dropout_key=stream())

    def _array_mask(self, mask, batch, q, k, roll=None) -> Mask:
        """Flax's boolean mask (broadcastable to ``[batch..., H, T, S]``) as a dense mask; while
        decoding, its key axis (absolute positions) rolled onto the cache's slots."""
        if not hasattr(mask, "shape"):
            raise TypeError(f"mask must be an attnjax.masks mask or an array; got {type(mask).__name__}")
        mask = jnp.asarray(mask) != 0  # as Flax: nonzero attends (nnx.make_attention_mask gives float32)
        H, T, S = self.num_heads, q.shape[1], k.shape[1]
        rank = len(batch) + 3
        full = (*batch, H, T, S)
        if mask.ndim > rank or any(m not in (1, f) for m, f in zip(mask.shape[::-1], full[::-1])):
            raise ValueError(
                f"mask has shape {mask.shape}; expected a shape broadcastable to "
                f"[batch..., heads, q_len, kv_len] = {list(full)}"
            )
        mask = mask.reshape((1,) * (rank - mask.ndim) + mask.shape)
        h = mask.shape[-3]
        if all(n == 1 for n in mask.shape[:-3]):  # shared by the batch: keep one copy
            mask = jnp.broadcast_to(mask.reshape(1, h, *mask.shape[-2:]), (1, h, T, S))
        else:
            mask = jnp.broadcast_to(mask, (*batch, h, T, S)).reshape(-1, h, T, S)
        if roll is not None:  # cache slot j holds token (seen - S + j): Flax's slot is the token
            mask = jnp.roll(mask, S - jnp.minimum(roll, S), axis=-1)
        return masks.dense(mask)

    # -- decoding --------------------------------------------------------------------------------
    #
    # Softmax and sigmoid attention decode with a KV cache. Recurrent ops (those taking
    # ``initial_state`` and ``return_final_state``, e.g. ``attnjax.ops.lightning_attention``)
    # decode with a fixed-size float32 state ``[B, H, D, E]`` instead, advanced by the op itself:
    # prefill and every step are the same call, so decode equals the full forward by construction
    # of the op's chunked recurrence.

    @property
    def _recurrent(self) -> bool:
        return {"initial_state", "return_final_state"} <= _parameters(self.attention_fn)

    def init_cache(
        self,
        input_shape: tuple[int, ...] | None = None,
        dtype=jnp.float32,
        *,
        batch_size: int | None = None,
        max_length: int | None = None,
    ) -> None:
        """Allocates the decode cache: Flax's way, ``input_shape = (batch..., max_length,
        features)``, or by ``batch_size`` and ``max_length``. A KV cache is
        ``[batch..., max_length, K, D]``; for a recurrent ``attention_fn`` it is its float32 state
        ``[B, H, D, D]`` (``max_length`` is then unused: the state does not grow)."""
        if input_shape is not None:
            if batch_size is not None or max_length is not None:
                raise TypeError("init_cache takes input_shape or batch_size/max_length, not both")
            if isinstance(input_shape, int) or len(input_shape) < 2:
                raise TypeError(
                    "init_cache's input_shape is Flax's (batch..., max_length, features); "
                    f"got {input_shape!r} (for sizes, use batch_size= and max_length=)"
                )
            *batch, max_length = tuple(input_shape)[:-1]
            batch = tuple(batch)
        else:
            if batch_size is None:
                raise TypeError(
                    "init_cache needs input_shape, or batch_size= (and max_length= for a KV cache)"
                )
            batch = (_checks.positive_int("batch_size", batch_size),)
        if self._recurrent:
            D = self.head_dim
            self.recurrent_state = nnx.Cache(jnp.zeros((math.prod(batch), self.num_heads, D, D), jnp.float32))
            return
        if max_length is None:
            raise ValueError("init_cache needs max_length for a KV cache")
        S = _checks.positive_int("max_length", max_length)
        shape = (*batch, S, self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

    def _advance_state(self, q, k, v, kwargs):
        if self.recurrent_state is None:
            raise ValueError("decode=True needs a state: call init_cache(batch_size=...) first")
        state = self.recurrent_state[...]
        if q.shape[0] != state.shape[0]:
            raise ValueError(
                f"the state was made for batch_size={state.shape[0]}; got a batch of {q.shape[0]}"
            )
        out, state = self.attention_fn(q, k, v, initial_state=state, return_final_state=True, **kwargs)
        self.recurrent_state[...] = state
        return out

    def _extend_cache(self, k, v):
        """The cache with the new keys and values appended, the mask of its filled slots, and the
        number of tokens seen (after this call)."""
        if self.cached_key is None:
            raise ValueError(
                "decode=True needs a cache: call init_cache(input_shape) or "
                "init_cache(batch_size=..., max_length=...) first"
            )
        shape = self.cached_key.shape
        S = shape[-3]
        ck = self.cached_key[...].reshape(-1, *shape[-3:])
        cv = self.cached_value[...].reshape(-1, *shape[-3:])
        B, t = ck.shape[0], k.shape[1]
        if k.shape[0] != B:
            raise ValueError(f"the cache was made for batch_size={B}; got a batch of {k.shape[0]}")
        if t > S:
            raise ValueError(f"{t} new tokens do not fit a cache of max_length={S}")
        # Newest tokens at the end: shift out the t oldest slots and append.
        ck = jnp.concatenate([ck[:, t:], k.astype(ck.dtype)], axis=1)
        cv = jnp.concatenate([cv[:, t:], v.astype(cv.dtype)], axis=1)
        seen = self.cache_index[...] + t
        self.cached_key[...], self.cached_value[...] = ck.reshape(shape), cv.reshape(shape)
        self.cache_index[...] = seen
        # Slots before S - seen are still empty: keys there are masked out.
        filled = ~masks.KeyPrefix(S - jnp.minimum(seen, S))
        return ck.astype(k.dtype), cv.astype(v.dtype), filled, seen


def _first(*values):
    """The first value that is not None (Flax's ``first_from``)."""
    return next((x for x in values if x is not None), None)


def _parameters(fn) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()
