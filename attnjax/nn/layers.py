"""Small building blocks shared by the attention modules: QK-norm, LayerScale, output gate, MLP,
and :func:`head_projections`, the one place the q/k/v/out projections are made.

Every parameter names its logical axes (:mod:`attnjax.nn.sharding`), so
:func:`attnjax.parallel.param_shardings` shards a model for FSDP and tensor parallelism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from attnjax.nn.sharding import axes, layer_norm, linear, param, rms_norm


class QKNorm(nnx.Module):
    """Normalizes queries and keys over the head dim before the dot product.

    ``q <- norm_q(q)``, ``k <- norm_k(k)`` with RMSNorm (default) or LayerNorm without bias, one
    learned scale per head-dim feature shared by all heads ("Scaling Vision Transformers to
    22 Billion Parameters", Dehghani et al. 2023): bounds the logits, so training tolerates higher
    learning rates.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> norm = QKNorm(8, rngs=nnx.Rngs(0))
    >>> q, k = norm(jnp.ones((1, 3, 2, 8)), jnp.ones((1, 5, 1, 8)))
    >>> q.shape, k.shape
    ((1, 3, 2, 8), (1, 5, 1, 8))
    """

    def __init__(self, head_dim: int, *, kind: str = "rms", epsilon: float = 1e-6, rngs: nnx.Rngs):
        if kind == "rms":
            make = lambda: rms_norm(head_dim, "head_dim", epsilon=epsilon, rngs=rngs)
        elif kind == "layer":
            make = lambda: layer_norm(head_dim, "head_dim", epsilon=epsilon, use_bias=False, rngs=rngs)
        else:
            raise ValueError(f"QKNorm kind must be 'rms' or 'layer'; got {kind!r}")
        self.query_norm = make()
        self.key_norm = make()

    def __call__(self, q: Float[Array, "B T H D"], k: Float[Array, "B S K D"]):
        return self.query_norm(q), self.key_norm(k)


class LayerScale(nnx.Module):
    """``x * gamma`` with a learned per-feature ``gamma`` initialised small ("Going deeper with
    Image Transformers", Touvron et al. 2021): residual branches start near identity.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> LayerScale(4, init_value=0.1, rngs=nnx.Rngs(0))(jnp.ones((2, 4)))[0]
    Array([0.1, 0.1, 0.1, 0.1], dtype=float32)
    """

    def __init__(self, features: int, *, init_value: float = 1e-5, rngs: nnx.Rngs | None = None):
        self.gamma = param(jnp.full((features,), init_value, jnp.float32), "embed")

    def __call__(self, x: Array) -> Array:
        return x * self.gamma[...].astype(x.dtype)


class OutputGate(nnx.Module):
    """Per-head elementwise sigmoid gate on the attention output, ``o * sigmoid(x W_g)``
    ("Gated Attention for Large Language Models", Qiu et al. 2025): adds input-dependent
    sparsity after the softmax and removes attention sinks."""

    def __init__(self, in_features: int, num_heads: int, head_dim: int, *, dtype=None, rngs: nnx.Rngs):
        self.proj = nnx.LinearGeneral(in_features, (num_heads, head_dim), use_bias=True, dtype=dtype, rngs=rngs,
                                      **projection_axes("embed", "heads", "head_dim"))

    def __call__(self, x: Float[Array, "B T C"], o: Float[Array, "B T H D"]) -> Float[Array, "B T H D"]:
        return o * jax.nn.sigmoid(self.proj(x)).astype(o.dtype)


class Mlp(nnx.Module):
    """``W_2 gelu(W_1 x)``, hidden width ``ratio * features``."""

    def __init__(self, features: int, *, ratio: float = 4.0, dtype=None, rngs: nnx.Rngs):
        hidden = int(round(ratio * features))
        self.fc1 = linear(features, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = linear(hidden, features, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))


def projection_axes(*names: str | None, inputs: int = 1) -> dict:
    """``kernel_metadata`` and ``bias_metadata`` for an ``nnx.LinearGeneral`` whose kernel has
    logical axes ``names`` (the first ``inputs`` of them contracted: the bias has the rest)."""
    return {"kernel_metadata": axes(*names), "bias_metadata": axes(*names[inputs:])}


def head_projections(in_features: int, heads: int, head_dim: int, *, kv_heads: int | None = None,
                     use_bias: bool = True, dtype=None, rngs: nnx.Rngs):
    """``(query, key, value, out)``: ``[..., C] -> [..., heads (kv_heads for key/value), head_dim]``
    projections and the output projection back to ``C``, shared by the attention modules.

    Logical axes: query ``(embed, heads, head_dim)``, key and value ``(embed, kv_heads, head_dim)``,
    out ``(heads, head_dim, embed)``: tensor parallelism splits q/k/v by heads and the output
    projection by its input heads, FSDP the model features."""
    kv = kv_heads or heads
    lin = lambda n, name: nnx.LinearGeneral(in_features, (n, head_dim), use_bias=use_bias, dtype=dtype, rngs=rngs,
                                            **projection_axes("embed", name, "head_dim"))
    # this order: parameter initialization follows it
    query, key, value = lin(heads, "heads"), lin(kv, "kv_heads"), lin(kv, "kv_heads")
    out = nnx.LinearGeneral((heads, head_dim), in_features, axis=(-2, -1), use_bias=use_bias, dtype=dtype, rngs=rngs,
                            **projection_axes("heads", "head_dim", "embed", inputs=2))
    return query, key, value, out
