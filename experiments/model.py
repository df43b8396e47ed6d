"""The model every experiment trains: embeddings, ``layers`` transformer blocks, a head.

Letter legend: B batch, T tokens, C width, F input features.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array

from attnjax import nn
from attnjax.nn import sharding

from .variants import LayerSpec, get as get_variant


class Model(nnx.Module):
    """Token (or feature) embedding plus learned positions, pre-norm blocks whose attention is the
    configured variant, a final LayerNorm and a linear head: per-token logits for language tasks,
    mean-pooled logits for classification. Returns ``(logits, aux_loss)`` (``aux_loss`` is the
    summed auxiliary loss of the attention layers, 0 for most variants)."""

    def __init__(self, cfg, task, *, bind=functools.partial, rngs: nnx.Rngs):
        C, T = cfg.width, task.seq_len(cfg)
        self.per_token = task.per_token
        if task.vocab_size is not None:
            self.embed = nnx.Embed(task.vocab_size, C, embedding_metadata=sharding.axes("vocab", "embed"), rngs=rngs)
        else:
            self.embed = sharding.linear(task.input_features, C, (None, "embed"), rngs=rngs)
        self.position = sharding.param(nnx.initializers.normal(0.02)(rngs.params(), (T, C)), None, "embed")
        variant = get_variant(cfg.variant)
        blocks = []
        for i in range(cfg.layers):
            spec = LayerSpec(C, cfg.heads, i, cfg.layers, task.causal, task.grid(cfg), cfg.implementation,
                             dict(cfg.variant_options), rngs, bind)
            attention = variant.build(spec)
            blocks.append(
                nn.TransformerBlock(C, cfg.heads, attention=attention, mlp_ratio=cfg.mlp_ratio, rngs=rngs)
            )
        self.blocks = nnx.List(blocks)
        self.norm = sharding.layer_norm(C, rngs=rngs)
        # Set Transformer pooling (variant_options {"pool": "pma"}): one learned seed attends over
        # the tokens (PMA_1) in place of the mean, for per-example tasks
        pma = not task.per_token and cfg.variant_options.get("pool") == "pma"
        self.pool = nn.PMA(C, cfg.heads, 1, implementation=cfg.implementation, rngs=rngs) if pma else None
        self.head = sharding.linear(C, task.num_outputs, ("embed", "vocab"), rngs=rngs)

    def __call__(self, inputs: Array) -> tuple[Array, Array]:
        x = self.embed(inputs) + self.position[...][: inputs.shape[1]]
        aux = jnp.zeros((), jnp.float32)
        for block in self.blocks:
            x = block(x)
            if isinstance(x, tuple):
                x, extra = x
                aux = aux + extra
        x = self.norm(x)
        if not self.per_token:
            x = jnp.mean(x, axis=1) if self.pool is None else self.pool(x)[:, 0]
        return self.head(x), aux


def loss_and_metrics(model: Model, batch: dict, aux_weight: float):
    """``(loss, (nll_sum, correct, weight_sum))``: weighted mean cross-entropy (+ aux) and the sums
    that evaluation accumulates over batches."""
    logits, aux = model(batch["inputs"])
    logits = logits.astype(jnp.float32)


    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"]
    total = jnp.sum(w)
    nll_sum = jnp.sum(nll * w)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * w)
    loss = nll_sum / jnp.maximum(total, 1.0) + aux_weight * aux
    return loss, (nll_sum, correct, total)


__all__ = ["Model", "loss_and_metrics"]
