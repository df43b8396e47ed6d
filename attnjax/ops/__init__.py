"""The public functional API: ``attnjax.ops.<variant>(q, k, v, ...) -> out``.

Tensors are ``[batch, seq, heads, head_dim]``; see :mod:`attnjax.core.tiling` for the letter
legend. Every op takes ``implementation=None | "reference" | "xla" | "pallas"``.

One folder per op family, each with the same files: ``api.py`` (validate, build the problem,
dispatch), ``reference.py``, ``xla.py`` and, where a kernel exists, ``pallas.py`` (a thin adapter
over :mod:`kernels_pallas`): ``attention/``, ``lightning/``, ``linear/``, ``neighborhood/``.
Composite variants, one file each, live in ``sparse/``, ``gated/`` and ``vision/``.
"""

from attnjax.core.blocks import BlockSizes
from attnjax.core.tiling import Shard
from attnjax.ops.attention.api import attention, sigmoid_attention
from attnjax.ops.gated.mega import damped_ema, ema_kernel, mega_attention
from attnjax.ops.gated.moh import MoHOutput, moh_attention
from attnjax.ops.gated.multi_token import multi_token_attention
from attnjax.ops.gated.selective import selective_attention, selective_temperature
from attnjax.ops.lightning.api import (
    lightning_attention,
    lightning_decode_step,
    lightning_layer_slopes,
    lightning_slopes,
)
from attnjax.ops.linear.api import linear_attention
from attnjax.ops.neighborhood.api import neighborhood_attention
from attnjax.ops.sparse.biformer import biformer_attention, bilevel_routing
from attnjax.ops.sparse.hyper import hyper_attention
from attnjax.ops.sparse.landmark import landmark_attention
from attnjax.ops.sparse.moa import moa_attention
from attnjax.ops.sparse.routing import routing_attention, routing_clusters, routing_init, routing_update
from attnjax.ops.vision.agent import agent_attention, pool_agents_1d, pool_agents_2d
from attnjax.ops.vision.maxvit import block_attention, grid_attention

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
    "biformer_attention", "bilevel_routing",
    "routing_attention", "routing_clusters", "routing_init", "routing_update",
    "moa_attention", "hyper_attention", "landmark_attention",
]

# Zoo part 2 (issue 21): gathered attention from index sets and the long-context variants on it.
from attnjax.ops.gathered.api import gathered_attention, selected_blocks

__all__ += ["gathered_attention", "selected_blocks"]
from attnjax.ops.sparse.coefficient import coefficient_attention
from attnjax.ops.sparse.partial import merge_partials, part_weights, partial_attentions, redistribute, reweight

__all__ += ["coefficient_attention", "merge_partials", "part_weights", "partial_attentions", "redistribute", "reweight"]
from attnjax.ops.sparse.cca import cca_attention, cca_core_tokens
from attnjax.ops.sparse.dma import dma_attention, dma_delta
from attnjax.ops.sparse.hepos import head_stride_mask, hepos_attention
from attnjax.ops.sparse.loki import loki_attention, loki_indices, loki_pca

__all__ += ["cca_attention", "cca_core_tokens", "dma_attention", "dma_delta", "head_stride_mask", "hepos_attention",
            "loki_attention", "loki_indices", "loki_pca"]

# -- zoo part 3 (issue 22): score-function variants ----------------------------------------------
from attnjax.ops.scored.neural import init_mlp as neural_attention_mlp
from attnjax.ops.scored.neural import neural_attention

__all__ += ["neural_attention", "neural_attention_mlp"]

# -- zoo part 3 (issue 22): linear-time variants ---------------------------------------------------
from attnjax.ops.kernelized.fastmax import fastmax_attention, fastmax_features, fastmax_normalize
from attnjax.ops.kernelized.flowformer import flow_attention
from attnjax.ops.kernelized.lightnet import lightnet_attention
from attnjax.ops.kernelized.nap import nap_attention

__all__ += ["fastmax_attention", "fastmax_features", "fastmax_normalize", "flow_attention", "lightnet_attention",
            "nap_attention"]

# -- zoo part 3 (issue 22): head-structure and factored-score variants ----------------------------
from attnjax.ops.attention.api import split_head_counts
from attnjax.ops.heads.diffqkv import diffqkv_attention
from attnjax.ops.scored.relational import relational_attention

__all__ += ["diffqkv_attention", "relational_attention", "split_head_counts"]
from attnjax.ops.heads.buckets import attention_buckets, rope

__all__ += ["attention_buckets", "rope"]
from attnjax.ops.scored.mvpa import mvpa_attention

__all__ += ["mvpa_attention"]
from attnjax.ops.scored.afa import adaptive_filter_attention

__all__ += ["adaptive_filter_attention"]


# -- zoo part 1 (vision structure): sampling and deformable attention ---------------------------
from attnjax.ops.vision.sampling import bilinear_gather
from attnjax.ops.vision.deformable import deformable_attention

__all__ += ["bilinear_gather", "deformable_attention"]
from attnjax.ops.vision.channel import channel_attention

__all__ += ["channel_attention"]
from attnjax.ops.vision.halo import halo_attention, halo_mask

__all__ += ["halo_attention", "halo_mask"]
from attnjax.ops.vision.gcvit import window_cross_attention

__all__ += ["window_cross_attention"]
from attnjax.ops.vision.area import area_attention

__all__ += ["area_attention"]
from attnjax.ops.vision.adl import attention_diversity_loss

__all__ += ["attention_diversity_loss"]
from attnjax.ops.vision.vsa import sampled_window_attention

__all__ += ["sampled_window_attention"]
from attnjax.ops.vision.catanet import cosine_assign, token_aggregation_attention

__all__ += ["cosine_assign", "token_aggregation_attention"]
from attnjax.ops.vision.vwa import varying_window_attention

__all__ += ["varying_window_attention"]


# Zoo part 4 (issue 23): set, classic and cross-modal attention.
from attnjax.ops.classic.additive import additive_attention, context_pooling
from attnjax.ops.classic.gat import gat_attention, gat_edge_list, gatv2_attention
from attnjax.ops.classic.set_transformer import mab_attention

__all__ += ["additive_attention", "context_pooling", "gat_attention", "gat_edge_list", "gatv2_attention",
            "mab_attention"]
from attnjax.ops.classic.bidaf import bidaf_attention, bidaf_similarity
from attnjax.ops.classic.reversed import reversed_attention
from attnjax.ops.classic.sentinel import sentinel_attention

__all__ += ["bidaf_attention", "bidaf_similarity", "reversed_attention", "sentinel_attention"]
from attnjax.ops.classic.dual_cross import glca_attention, glca_queries, pwca_attention
from attnjax.ops.classic.pooling import (
    efficient_probe, gated_mil_features, gated_mil_pooling, label_attention, stkim_keep,
)

__all__ += ["glca_attention", "glca_queries", "pwca_attention", "efficient_probe", "gated_mil_features",
            "gated_mil_pooling", "label_attention", "stkim_keep"]
from attnjax.ops.classic.lightconv import dynamic_conv, lightweight_conv

__all__ += ["dynamic_conv", "lightweight_conv"]
from attnjax.ops.classic.latent import (
    alignment_elbo, alignment_marginal, categorical_kl, doubly_stochastic_penalty, hard_attention,
    reinforce_surrogate,
)

__all__ += ["alignment_elbo", "alignment_marginal", "categorical_kl", "doubly_stochastic_penalty", "hard_attention",
            "reinforce_surrogate"]
from attnjax.ops.classic.region import reference_scaling, region_attention

__all__ += ["reference_scaling", "region_attention"]
from attnjax.ops.classic.coarse_to_fine import coarse_to_fine_attention, coarse_to_fine_hard, grid_cells, sparsemax

__all__ += ["coarse_to_fine_attention", "coarse_to_fine_hard", "grid_cells", "sparsemax"]
from attnjax.ops.sparse.blocktf import block_embed, block_token_attention

__all__ += ["block_embed", "block_token_attention"]
