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
from attnjax.ops.maxvit import block_attention, grid_attention
from attnjax.ops.mega import damped_ema, ema_kernel, mega_attention
from attnjax.ops.moh import MoHOutput, moh_attention
from attnjax.ops.multi_token import multi_token_attention
from attnjax.ops.neighborhood import neighborhood_attention
from attnjax.ops._common import Shard
from attnjax.ops.selective import selective_attention, selective_temperature
from attnjax.ops.xla import BlockSizes

__all__ = [
    "attention", "sigmoid_attention", "BlockSizes", "Shard",
    "agent_attention", "pool_agents_1d", "pool_agents_2d",
    "lightning_attention", "lightning_decode_step", "lightning_layer_slopes", "lightning_slopes",
    "linear_attention",
    "moh_attention", "MoHOutput",
    "neighborhood_attention",
    "block_attention", "grid_attention",
    "damped_ema", "ema_kernel", "mega_attention",
    "multi_token_attention",
    "selective_attention", "selective_temperature",
]
