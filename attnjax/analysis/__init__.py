"""See what attention does, for any op and any model (issue 24).

* capture (:mod:`~attnjax.analysis.capture`): weights of any op (:func:`attention_weights`), and of
  the attention layers of a Flax NNX model without changing its code (:func:`capture`, works under
  ``nnx.jit``); blockwise statistics without a ``[T, S]`` array (:func:`blockwise_stats`, equal
  to :func:`weight_stats` on dense weights);
* attribution across layers (:mod:`~attnjax.analysis.rollout`): :func:`rollout`, :func:`flow`,
  gradient-weighted rollout;
* head importance (:mod:`~attnjax.analysis.importance`): :func:`head_gates`,
  :func:`head_importance` (Michel et al.), :func:`pruning_curve`;
* detectors (:mod:`~attnjax.analysis.detectors`): sinks, massive activations, previous-token,
  offset, delimiter and copy/retrieval heads, WAAD, FAI, entropy;
* views (:mod:`~attnjax.analysis.views`): matplotlib figures (imported lazily).
"""

from attnjax.analysis import views
from attnjax.analysis.capture import (
    ATTENTION_MODULES,
    ATTENTION_OPS,
    Capture,
    HeadGate,
    attention_layers,
    attention_weights,
    capture,
)
from attnjax.analysis.detectors import (
    SinkReport,
    copy_score,
    delimiter_score,
    entropy,
    fai,
    massive_activations,
    offset_heads,
    offset_score,
    previous_token_score,
    sinks,
    waad,
)
from attnjax.analysis.importance import head_gates, head_importance, pruning_curve
from attnjax.analysis.rollout import flow, fuse_heads, layer_maps, max_flow, rollout
from attnjax.analysis.stats import StatsConfig, blockwise_stats, reduce_stats, weight_stats

__all__ = [
    "ATTENTION_MODULES",
    "ATTENTION_OPS",
    "Capture",
    "HeadGate",
    "SinkReport",
    "StatsConfig",
    "attention_layers",
    "attention_weights",
    "blockwise_stats",
    "capture",
    "copy_score",
    "delimiter_score",
    "entropy",
    "fai",
    "flow",
    "fuse_heads",
    "head_gates",
    "head_importance",
    "layer_maps",
    "massive_activations",
    "max_flow",
    "offset_heads",
    "offset_score",
    "previous_token_score",
    "pruning_curve",
    "reduce_stats",
    "rollout",
    "sinks",
    "views",
    "waad",
    "weight_stats",
]
