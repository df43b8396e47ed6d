"""Channel-last (``[B, h, w, C]``) NNX modules for CNN attention (zoo part 1, items 1.13-1.20):
gates (:class:`CBAM`, :class:`TripletAttention`, :class:`ELA`, :class:`ULSAM`,
:class:`DeformableGate`) and aggregating modules (:class:`DualAttentionUnit`, :class:`SKFF`,
:class:`PositionAttention`, :class:`ChannelAttentionModule`, :class:`TokenAwarePooling`).
Norms default to ones without batch statistics; ``norm="batch"`` where the official code uses BN
(see :mod:`attnjax.nn.cnn.common`)."""

from attnjax.nn.cnn.dual import (
    SKFF,
    ChannelAttentionModule,
    DualAttentionUnit,
    PositionAttention,
    TokenAwarePooling,
)
from attnjax.nn.cnn.gates import CBAM, ELA, ULSAM, ChannelGate, DeformableGate, SpatialGate, TripletAttention

__all__ = [
    "CBAM",
    "ELA",
    "SKFF",
    "ULSAM",
    "ChannelAttentionModule",
    "ChannelGate",
    "DeformableGate",
    "DualAttentionUnit",
    "PositionAttention",
    "SpatialGate",
    "TokenAwarePooling",
    "TripletAttention",
]
