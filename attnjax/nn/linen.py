"""Linen wrappers of the NNX modules, through ``flax.nnx.bridge``, for code still on linen.

Each wrapper is a ``linen.Module`` whose ``init``/``apply`` behave like any linen module; the
NNX parameters live in linen's ``params`` collection (boxed as ``nnx.bridge`` does). The KV
cache (``decode=True``) is NNX-only.

>>> import jax, jax.numpy as jnp
>>> from attnjax import masks
>>> from attnjax.nn import linen as attn_linen
>>> layer = attn_linen.MultiHeadAttention(4, 16, mask=masks.causal())
>>> x = jnp.ones((2, 5, 16))
>>> variables = layer.init(jax.random.key(0), x)
>>> layer.apply(variables, x).shape
(2, 5, 16)
"""

from __future__ import annotations

from flax import linen
from flax.nnx import bridge

from attnjax.nn.agent import AgentAttention as _AgentAttention
from attnjax.nn.attention import MultiHeadAttention as _MultiHeadAttention
from attnjax.nn.block import TransformerBlock as _TransformerBlock
from attnjax.nn.moh import MoHAttention as _MoHAttention


def to_linen(nnx_class, *args, **kwargs) -> linen.Module:
    """Any NNX module class of attnjax (or yours) as a linen module: ``bridge.ToLinen``."""
    return bridge.ToLinen(nnx_class, args=args, kwargs=kwargs)


def MultiHeadAttention(num_heads: int, in_features: int, **kwargs) -> linen.Module:
    """Linen :class:`attnjax.nn.MultiHeadAttention` (same arguments, without ``rngs``)."""
    return to_linen(_MultiHeadAttention, num_heads, in_features, **kwargs)


def AgentAttention(num_heads: int, in_features: int, **kwargs) -> linen.Module:
    """Linen :class:`attnjax.nn.AgentAttention` (same arguments, without ``rngs``)."""
    return to_linen(_AgentAttention, num_heads, in_features, **kwargs)


def MoHAttention(num_heads: int, in_features: int, **kwargs) -> linen.Module:
    """Linen :class:`attnjax.nn.MoHAttention` (same arguments, without ``rngs``); returns ``(y, aux_loss)``."""
    return to_linen(_MoHAttention, num_heads, in_features, **kwargs)


def TransformerBlock(in_features: int, num_heads: int, **kwargs) -> linen.Module:
    """Linen :class:`attnjax.nn.TransformerBlock` (same arguments, without ``rngs``)."""
    return to_linen(_TransformerBlock, in_features, num_heads, **kwargs)
