"""Attention variants by name: how each one builds the attention layer of a transformer block.

A new variant plugs in by adding one :class:`Variant` to :data:`VARIANTS`. The attention math is
always an :mod:`attnjax.ops` function or an :mod:`attnjax.nn` module; this file only chooses
arguments (causality, decay slopes, window, agents). The variant (what attention computes) and
``implementation`` (which code path computes it: ``"xla"``, ``"reference"``, ``"pallas"``) are
separate config keys.

Every op-based variant binds its op through :attr:`LayerSpec.bind`, the one place where the
training loop's device mesh enters the attention call: ``bind(op, **kwargs)`` is
``functools.partial(op, **kwargs)`` on one device or a batch-sharded mesh, and
``functools.partial(attnjax.parallel.shard_op(op, mesh), **kwargs)`` when heads or the sequence
are sharded (``shard_op`` recognises the bare op, so options go in as keyword arguments).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from flax import nnx

from attnjax import masks, nn, ops


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What a variant needs to build one attention layer."""

    features: int
    heads: int
    layer: int
    num_layers: int
    causal: bool
    grid: tuple[int, int] | None            # tokens form this 2-D grid (row-major), or None
    implementation: str | None
    options: dict
    rngs: nnx.Rngs
    bind: Callable = functools.partial      # (op, **kwargs) -> attention_fn, placed on the mesh


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[[LayerSpec], nnx.Module]
    paper: str
    causal: bool = True                     # can run causally (language modelling)
    bidirectional: bool = True              # can run without a mask (classification)
    options: tuple[str, ...] = ()           # the keys of variant_options it reads
    needs_grid: bool = False                # only for tasks whose tokens form a 2-D grid

    def check_task(self, task, cfg) -> None:
        """Raises ``ValueError`` if this variant cannot serve ``task`` (or gets unknown options)."""
        if task.causal and not self.causal:
            raise ValueError(f"variant {self.name!r} is not causal, so it cannot run task {task.name!r}; "
                             f"causal variants: {', '.join(n for n, v in VARIANTS.items() if v.causal)}")
        if not task.causal and not self.bidirectional:
            raise ValueError(f"variant {self.name!r} is causal only, so it cannot run the bidirectional task "
                             f"{task.name!r}; bidirectional variants: "
                             f"{', '.join(n for n, v in VARIANTS.items() if v.bidirectional)}")
        if self.needs_grid and task.grid(cfg) is None:
            raise ValueError(f"variant {self.name!r} works on 2-D grids; task {task.name!r} is a sequence")
        unknown = set(cfg.variant_options) - set(self.options)
        if unknown:
            raise ValueError(f"variant {self.name!r} takes variant_options {list(self.options)}; "
                             f"got unknown {sorted(unknown)}")


def _mha(spec: LayerSpec, op: Callable, *, masked: bool = True) -> nn.MultiHeadAttention:
    """``nn.MultiHeadAttention`` around a bound op (with the causal mask when the task needs one)."""
    return nn.MultiHeadAttention(
        spec.heads, spec.features, attention_fn=op, use_bias=False,
        mask=masks.causal() if masked and spec.causal else None, rngs=spec.rngs,
    )


def _on_grid(op: Callable, grid: tuple[int, ...], q, k, v, **kwargs):
    """Runs a spatial op on ``[B, h*w, H, D]`` tokens laid out row-major on ``grid``."""
    shape = lambda x: (x.shape[0], *grid, *x.shape[2:])
    out = op(q.reshape(shape(q)), k.reshape(shape(k)), v.reshape(shape(v)), **kwargs)
    return out.reshape(q.shape[:2] + out.shape[-2:])


class _GridInput(nnx.Module):
    """Feeds ``[B, h*w, C]`` tokens to a module that takes ``[B, h, w, C]``."""

    def __init__(self, inner: nnx.Module, grid: tuple[int, int]):
        self.inner, self.grid = inner, grid

    def __call__(self, x):
        y = self.inner(x.reshape(x.shape[0], *self.grid, x.shape[-1]))
        return y.reshape(x.shape)


def _softmax(spec):
    return _mha(spec, spec.bind(ops.attention, implementation=spec.implementation))


def _sigmoid(spec):
    return _mha(spec, spec.bind(ops.sigmoid_attention, implementation=spec.implementation))


def _linear(spec):
    op = spec.bind(ops.linear_attention, is_causal=spec.causal, implementation=spec.implementation,
                   feature_map=spec.options.get("feature_map", "elu1"))
    return _mha(spec, op, masked=False)


def _lightning(spec):
    # The paper's per-layer decay slopes: fast decay in early layers, slow in late ones.
    log_decay = -ops.lightning_layer_slopes(spec.heads, spec.layer, spec.num_layers)
    op = spec.bind(ops.lightning_attention, log_decay=log_decay, implementation=spec.implementation)
    return _mha(spec, op, masked=False)


def _neighborhood(spec):
    window = spec.options.get("window", 3 if spec.grid else 15)
    op = spec.bind(ops.neighborhood_attention, kernel_size=window, is_causal=spec.causal,
                   implementation=spec.implementation)
    if spec.grid is not None:  # on a mesh, the grid's rows are the sequence axis (halo exchange)
        grid_op = functools.partial(_on_grid, op, spec.grid)
        return nn.MultiHeadAttention(spec.heads, spec.features, attention_fn=grid_op, use_bias=False,
                                     rngs=spec.rngs)
    return _mha(spec, op, masked=False)


def _agent(spec):
    agents = spec.options.get("agents", (4, 4) if spec.grid else 16)
    module = nn.AgentAttention(spec.heads, spec.features, agents=agents, implementation=spec.implementation,
                               bias_size=spec.options.get("bias_size", 7), rngs=spec.rngs)
    return _GridInput(module, spec.grid) if spec.grid is not None else module


def _moh(spec):
    shared = spec.options.get("shared_heads", max(1, spec.heads // 4))
    top_k = spec.options.get("top_k", max(1, (spec.heads - shared) // 2))
    return nn.MoHAttention(spec.heads, spec.features, num_shared_heads=shared, top_k=top_k,
                           mask=masks.causal() if spec.causal else None, implementation=spec.implementation,
                           rngs=spec.rngs)


def _selective(spec):
    return nn.SelectiveAttention(spec.heads, spec.features, mask=masks.causal() if spec.causal else None,
                                 implementation=spec.implementation, rngs=spec.rngs)


def _multi_token(spec):
    kernel = tuple(spec.options.get("kernel", (6, 11)))
    return nn.MultiTokenAttention(spec.heads, spec.features, kernel=kernel,
                                  mask=masks.causal() if spec.causal else None,
                                  implementation=spec.implementation, rngs=spec.rngs)


def _mega(spec):
    return nn.MegaLayer(spec.features, qk_dim=spec.features // spec.heads, is_causal=spec.causal,
                        chunk_size=spec.options.get("chunk_size"), implementation=spec.implementation,
                        rngs=spec.rngs)


def _maxvit(spec):
    # Alternate layers: block attention (local windows), then grid attention (dilated, global).
    size = spec.options.get("size", 4)
    kind = {"window": size} if spec.layer % 2 == 0 else {"grid": size}
    module = nn.MultiAxisAttention(spec.heads, spec.features, implementation=spec.implementation,
                                   rngs=spec.rngs, **kind)
    return _GridInput(module, spec.grid)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("softmax", _softmax, "Attention Is All You Need (Vaswani et al. 2017)"),
    Variant("sigmoid", _sigmoid,
            "Theory, Analysis, and Best Practices for Sigmoid Self-Attention (Ramapuram et al. 2024)"),
    Variant("linear", _linear, "Transformers are RNNs (Katharopoulos et al. 2020)", options=("feature_map",)),
    Variant("lightning", _lightning, "Lightning Attention-2 (Qin et al. 2024)", bidirectional=False),
    Variant("neighborhood", _neighborhood, "Neighborhood Attention Transformer (Hassani et al. 2023)",
            options=("window",)),
    Variant("agent", _agent, "Agent Attention (Han et al. 2024)", causal=False,
            options=("agents", "bias_size")),
    Variant("moh", _moh, "MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin et al. 2024)",
            options=("shared_heads", "top_k")),
    Variant("selective", _selective, "Selective Attention: Enhancing Transformer through Principled "
            "Context Control (Zhang et al. 2024)"),
    Variant("multi_token", _multi_token, "Multi-Token Attention (Golovneva et al. 2025)",
            options=("kernel",)),
    Variant("mega", _mega, "Mega: Moving Average Equipped Gated Attention (Ma et al. 2023)",
            options=("chunk_size",)),
    Variant("maxvit", _maxvit, "MaxViT: Multi-Axis Vision Transformer (Tu et al. 2022)", causal=False,
            needs_grid=True, options=("size",)),
)}


def get(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown attention variant {name!r}; known variants: {', '.join(VARIANTS)}")
    return VARIANTS[name]


# -- zoo part 3 (issue 22): linear, normalizer, score-function and head-structure variants ----------


def _causal_mask(spec):
    return masks.causal() if spec.causal else None


def _linear_time(op):
    def build(spec):
        return _mha(spec, spec.bind(op, is_causal=spec.causal, implementation=spec.implementation), masked=False)
    return build


def _zoo3_module(cls, **fixed):
    def build(spec):
        extra = {k: spec.options[k] for k in spec.options}
        return cls(spec.heads, spec.features, mask=_causal_mask(spec), implementation=spec.implementation,
                   rngs=spec.rngs, **fixed, **extra)
    return build


def _dual(spec):
    half = max(spec.heads // 2, 1)
    return nn.DualAttention(half, max(spec.heads - half, 1), spec.features, max_len=spec.options.get("max_len", 1024),
                            mask=_causal_mask(spec), implementation=spec.implementation, rngs=spec.rngs)


def _diffqkv(spec):
    D = spec.features // spec.heads
    return nn.DiffQKVAttention(spec.heads, spec.features, num_k_heads=1, num_v_heads=max(spec.heads // 2, 1),
                               k_head_dim=max(D // 2, 1), v_head_dim=D, q_aug_dim=2 * spec.features,
                               value_top_k=spec.options.get("value_top_k"), mask=_causal_mask(spec),
                               implementation=spec.implementation, rngs=spec.rngs)


VARIANTS.update({v.name: v for v in (
    Variant("flowformer", _linear_time(ops.flow_attention),
            "Flowformer: Linearizing Transformers with Conservation Flows (Wu et al. 2022)"),
    Variant("fastmax", _linear_time(ops.fastmax_attention),
            "FAST: Factorizable Attention for Speeding up Transformers (Gerami et al. 2024)"),
    Variant("lightnet", _linear_time(ops.lightnet_attention),
            "You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet (Qin et al. 2024)"),
    Variant("nap", _linear_time(ops.nap_attention),
            "Normalized Attention Without Probability Cage (Richter & Wattenhofer 2020)"),
    Variant("neural", _zoo3_module(nn.NeuralAttention),
            "Neural Attention: A Novel Mechanism for Enhanced Expressive Power in Transformer Models "
            "(DiGiugno & Mahmood 2025)", options=("score_dim", "hidden")),
    Variant("rcmha", _zoo3_module(nn.RCMHA),
            "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling (Sugiharto et al. "
            "2023)", options=("kernel_size", "max_distance")),
    Variant("dual_attention", _dual, "Disentangling and Integrating Relational and Sensory Information in "
            "Transformer Architectures (Altabaa & Lafferty 2024)", options=("max_len",)),
    Variant("mhe", _zoo3_module(nn.MHEAttention), "Pit One Against Many: Leveraging Attention-head Embeddings "
            "for Parameter-efficient Multi-head Attention (Xue & Aletras 2023)", options=("mode",)),
    Variant("pay_better", _zoo3_module(nn.PayBetterAttention), "You Need to Pay Better Attention (Hosseini & "
            "Hosseini 2024): optimised / efficient attention", options=("kind",)),
    Variant("minimal", _zoo3_module(nn.MinimalAttention), "Reducing the Transformer Architecture to a Minimum "
            "(Bermeitinger et al. 2024)", options=("qk", "qk_dim", "values")),
    Variant("diffqkv", _diffqkv, "Sigma: Differential Rescaling of Query, Key and Value for Efficient Language "
            "Models (Lin et al. 2025)", options=("value_top_k",)),
)})


# -- zoo part 4: Set Transformer blocks as the attention layer (bidirectional: sets) ---------------


def _sab(spec):
    return nn.SAB(spec.features, spec.features, spec.heads, implementation=spec.implementation, rngs=spec.rngs)


def _isab(spec):
    return nn.ISAB(spec.features, spec.features, spec.heads, spec.options.get("inducing", 8),
                   implementation=spec.implementation, rngs=spec.rngs)


for _v in (
    # "pool": "pma" makes the model pool by PMA (experiments/model.py) instead of the mean
    Variant("sab", _sab, "Set Transformer (Lee et al. 2019): SAB", causal=False, options=("pool",)),
    Variant("isab", _isab, "Set Transformer (Lee et al. 2019): ISAB", causal=False, options=("inducing", "pool")),
):
    VARIANTS[_v.name] = _v
