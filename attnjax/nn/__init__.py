"""Flax NNX modules that hold parameters and call :mod:`attnjax.ops` (and linen wrappers).

* :class:`MultiHeadAttention`: projections, GQA, QK-norm, output gate and a KV cache around any
  attnjax op (``attention_fn=``);
* :class:`AgentAttention`, :class:`MoHAttention`, :class:`RoutingAttention`, :class:`MegaLayer`, :class:`MultiTokenAttention`, :class:`SelectiveAttention`,
  :class:`MultiAxisAttention` /
  :class:`MaxViTBlock` (MaxViT), :class:`L2ViTBlockPair` (L2ViT): the modules of those papers;
* :class:`TransformerBlock`: pre-norm or Hybrid-Norm residual block; :class:`QKNorm`,
  :class:`LayerScale`, :class:`OutputGate`, :class:`Mlp` pieces;
* :func:`flax_attention_fn`: any attnjax op as ``flax.nnx.MultiHeadAttention(attention_fn=...)``;
* :mod:`attnjax.nn.linen`: the modules as linen modules (``flax.nnx.bridge``);
* :mod:`attnjax.nn.sharding`: every parameter names its logical axes, so
  :func:`attnjax.parallel.param_shardings` shards a model for FSDP and tensor parallelism.

The modules never reimplement attention math: each ``__call__`` is projections, an op call and
an output projection, and the tests check exactly that.
"""

from attnjax.nn.agent import AgentAttention
from attnjax.nn.attention import MultiHeadAttention, combine_masks
from attnjax.nn.block import TransformerBlock
from attnjax.nn.flax_adapter import DenseMask, dense_mask, flax_attention_fn
from attnjax.nn.l2vit import L2ViTBlock, L2ViTBlockPair, LinearGlobalAttention, LocalConcentration
from attnjax.nn.layers import LayerScale, Mlp, OutputGate, QKNorm
from attnjax.nn.maxvit import MaxViTBlock, MultiAxisAttention
from attnjax.nn.mega import MegaLayer
from attnjax.nn.moh import MoHAttention
from attnjax.nn.multi_token import MultiTokenAttention
from attnjax.nn.selective import SelectiveAttention
from attnjax.nn.routing import Centroids, RoutingAttention

__all__ = [
    "AgentAttention", "MultiHeadAttention", "MoHAttention", "RoutingAttention", "Centroids", "TransformerBlock",
    "QKNorm", "LayerScale", "OutputGate", "Mlp",
    "flax_attention_fn", "DenseMask", "dense_mask", "combine_masks",
    "MegaLayer", "MultiAxisAttention", "MaxViTBlock", "MultiTokenAttention", "SelectiveAttention",
    "LinearGlobalAttention", "LocalConcentration", "L2ViTBlock", "L2ViTBlockPair",
]

# -- zoo part 3 (issue 22) --------------------------------------------------------------------------
from attnjax.nn.scored import RCMHA, DualAttention, NeuralAttention

__all__ += ["DualAttention", "NeuralAttention", "RCMHA"]
from attnjax.nn.heads import DiffQKVAttention, MHEAttention, MinimalAttention, PayBetterAttention, RoPEAttention

__all__ += ["DiffQKVAttention", "MHEAttention", "MinimalAttention", "PayBetterAttention", "RoPEAttention"]
from attnjax.nn.pooling import GaussianAdaptiveAttention, LAMAPooling, NiNformerGate, gaussian_mixture_weights

__all__ += ["GaussianAdaptiveAttention", "LAMAPooling", "NiNformerGate", "gaussian_mixture_weights"]
from attnjax.nn.skim import SkimAttention, skim_mask

__all__ += ["SkimAttention", "skim_mask"]
from attnjax.nn.shrp import HeadUsage, SHRPAttention

__all__ += ["HeadUsage", "SHRPAttention"]


# -- zoo part 1 (vision structure) ----------------------------------------------------------------
from attnjax.nn.deformable import MSDeformableAttention
from attnjax.nn.vision_windows import (
    AreaAttention,
    CrossFormerAttention,
    CrossFormerBlock,
    DynamicPosBias,
    GCViTGlobalQuery,
    GlobalWindowAttention,
    HaloAttention,
    VSAWindowAttention,
    VaryingWindowAttention,
)

__all__ += [
    "MSDeformableAttention", "AreaAttention", "CrossFormerAttention", "CrossFormerBlock", "DynamicPosBias",
    "GCViTGlobalQuery", "GlobalWindowAttention", "HaloAttention", "VSAWindowAttention",
    "VaryingWindowAttention",
]
from attnjax.nn.vision_tokens import (
    BoxRPBCrossAttention,
    CATANetAttention,
    ChannelGroupAttention,
    CrossAttentionToken,
    CrossViTFusion,
    DaViTBlock,
    TNTBlock,
)

__all__ += ["BoxRPBCrossAttention", "CATANetAttention", "ChannelGroupAttention", "CrossAttentionToken", "CrossViTFusion", "DaViTBlock",
            "TNTBlock"]
from attnjax.nn import cnn

__all__ += ["cnn"]


# Zoo part 4 (issue 23): set and graph modules.
from attnjax.nn.set_transformer import ISAB, MAB, PMA, SAB

__all__ += ["MAB", "SAB", "ISAB", "PMA"]
from attnjax.nn.graph import GraphAttention

__all__ += ["GraphAttention"]
from attnjax.nn.fit import FITBlock

__all__ += ["FITBlock"]
from attnjax.nn.classic import AdditiveAttention, BiDAFAttention, EfficientProbe, GatedMILPooling, LabelAttention

__all__ += ["AdditiveAttention", "BiDAFAttention", "EfficientProbe", "GatedMILPooling", "LabelAttention"]
