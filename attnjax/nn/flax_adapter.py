"""Use any attnjax op as the ``attention_fn`` of Flax's own attention modules.

``flax.nnx.MultiHeadAttention`` (and ``flax.linen.MultiHeadDotProductAttention``) call
``attention_fn(query, key, value, mask=..., dropout_rng=..., dropout_rate=...,
broadcast_dropout=..., deterministic=..., dtype=..., precision=..., module=..., is_causal=...)``
with ``[batch..., length, heads, head_dim]`` arrays and a boolean ``mask`` broadcastable to
``[batch..., heads, q_length, kv_length]``. :func:`flax_attention_fn` turns an attnjax op into
such a function.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array

from attnjax import masks, ops
from attnjax.masks import Dense as DenseMask  # noqa: F401  (re-exported by attnjax.nn)
from attnjax.masks import Mask
from attnjax.masks import dense as dense_mask


def _top_left_causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def flax_attention_fn(op: Callable[..., Array] = ops.attention, **op_kwargs) -> Callable[..., Array]:
    """An ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` that runs the attnjax ``op``.

    The returned function accepts Flax's calling convention and calls
    ``op(q, k, v, mask=..., **op_kwargs)``:

    * ``mask`` (boolean, ``True`` = attend, broadcastable to ``[batch..., heads, T, S]``) becomes
      a :class:`DenseMask`, combined by ``&`` with a ``mask`` in ``op_kwargs``; a row with every
      key masked gives zeros here (Flax's default gives the mean of the values);
    * ``is_causal=True`` adds Flax's causal mask, which is *top-left* aligned
      (``tril((T, S))``); with ``T == S`` it is :func:`attnjax.masks.causal`;
    * ``dtype`` casts q/k/v first (as Flax's ``promote_dtype``); ``precision`` is ignored (attnjax
      picks float32 matmuls for float32 inputs);
    * extra leading batch axes are flattened and restored;
    * ``dropout_rate > 0`` with ``deterministic=False`` becomes the op's ``dropout_rate`` with
      ``dropout_rng`` as its ``dropout_key`` (for ops that take them; others raise
      ``NotImplementedError``). attnjax drops each ``(b, h, q, kv)`` weight independently, so
      Flax's ``broadcast_dropout`` (one pattern shared by the batch and heads) is not honoured;
    * ``module=`` (``sow_weights``: attnjax never forms the weights), ``bias=`` and
      ``input_positions=`` raise ``NotImplementedError``.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    >>> mk = lambda fn: nnx.MultiHeadAttention(4, 16, attention_fn=fn, decode=False, rngs=nnx.Rngs(0))
    >>> ours = mk(nn.flax_attention_fn())(x, is_causal=True)
    >>> theirs = mk(nnx.dot_product_attention)(x, is_causal=True)
    >>> bool(jnp.allclose(ours, theirs, atol=1e-5))
    True
    """
    if not callable(op):
        raise TypeError(f"op must be an attnjax op (callable); got {op!r}")
    base_mask = op_kwargs.pop("mask", None)

    def attention_fn(
        query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
        dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
        is_causal=False, promote_dtype=None, input_positions=None,
    ):
        kwargs = op_kwargs
        if dropout_rate > 0.0 and not deterministic:
            if "dropout_rate" not in inspect.signature(op).parameters:
                raise NotImplementedError(
                    f"flax_attention_fn: {getattr(op, '__name__', op)} has no attention dropout; "
                    "use dropout_rate=0 or deterministic=True")
            if dropout_rng is None:
                raise ValueError("flax_attention_fn: dropout_rate > 0 with deterministic=False needs dropout_rng")
            kwargs = dict(op_kwargs, dropout_rate=float(dropout_rate), dropout_key=dropout_rng)
        if module is not None:
            raise NotImplementedError("flax_attention_fn: sow_weights/module= is not supported (attnjax ops never form the attention weights)")
        if bias is not None:
            raise NotImplementedError("flax_attention_fn: pass additive biases to the attnjax op (op_kwargs), not bias=")
        if input_positions is not None:
            raise NotImplementedError("flax_attention_fn: input_positions (RoPE) is not supported")
        if dtype is not None:
            query, key, value = (x.astype(dtype) for x in (query, key, value))
        else:
            dt = jnp.result_type(query, key, value)
            query, key, value = (x.astype(dt) for x in (query, key, value))
        batch_shape = query.shape[:-3]
        flat = lambda x: x.reshape((math.prod(x.shape[:-3]), *x.shape[-3:]))
        q, k, v = flat(query), flat(key), flat(value)
        T, S = q.shape[1], k.shape[1]
        m = base_mask
        if mask is not None:
            m = _and(m, _flax_mask(mask, batch_shape, q.shape[2], T, S))
        if is_causal:
            m = _and(m, masks.causal() if T == S else masks.from_fn(_top_left_causal))
        out = op(q, k, v, **kwargs) if m is None else op(q, k, v, mask=m, **kwargs)
        return out.reshape((*batch_shape, *out.shape[1:]))

    attention_fn.__name__ = f"flax_attention_fn({getattr(op, '__name__', 'op')})"
    return attention_fn


def _and(a: Mask | None, b: Mask) -> Mask:
    return b if a is None else a & b


def _flax_mask(mask, batch_shape, heads, T, S) -> Mask:
    """Flax's boolean mask (broadcastable to ``[batch..., H, T, S]``) as a rank-4 DenseMask."""
    mask = jnp.asarray(mask)
    rank = len(batch_shape) + 3
    if mask.ndim > rank:
        raise ValueError(f"mask has shape {mask.shape}; expected at most rank {rank} [batch..., heads, T, S]")
    mask = mask.reshape((1,) * (rank - mask.ndim) + mask.shape)
    full = (*batch_shape, heads, T, S)
    try:
        jnp.broadcast_shapes(mask.shape, full)
    except ValueError:
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to [batch..., heads, T, S] = {full}") from None
    lead = mask.shape[:-3]
    h = mask.shape[-3]
    if all(n == 1 for n in lead):
        mask = jnp.broadcast_to(mask, (*lead, h, T, S)).reshape(1, h, T, S)
    else:
        mask = jnp.broadcast_to(mask, (*batch_shape, h, T, S)).reshape(-1, h, T, S)
    return dense_mask(mask)
