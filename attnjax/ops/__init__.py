"""The public functional API: ``attnjax.ops.<variant>(q, k, v, ...) -> out``.

Tensors are ``[batch, seq, heads, head_dim]``; see :mod:`attnjax.ops._common` for the letter
legend. Every op takes ``implementation=None | "reference" | "xla" | "pallas"``.
"""

from attnjax.ops.agent import agent_attention, pool_agents_1d, pool_agents_2d
from attnjax.ops.attention import attention, sigmoid_attention
from attnjax.ops.lightning import (
    lightning_attention,
    lightning_decode_step,
    lightning_layer_slopes,
    lightning_slopes,
)
from attnjax.ops.linear import linear_attention
from attnjax.ops.moh import MoHOutput, moh_attention
from attnjax.ops.neighborhood import neighborhood_attention
from attnjax.ops._common import Shard
from attnjax.ops.xla import BlockSizes

__all__ = [
    "attention", "sigmoid_attention", "BlockSizes", "Shard",
    "agent_attention", "pool_agents_1d", "pool_agents_2d",
    "lightning_attention", "lightning_decode_step", "lightning_layer_slopes", "lightning_slopes",
    "linear_attention",
    "moh_attention", "MoHOutput",
    "neighborhood_attention",
]
