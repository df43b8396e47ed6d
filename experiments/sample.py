"""A short text sample from a trained character-level model, printed at the end of a run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PROMPT = b"def "


def generate(
    model,
    *,
    seq_len: int,
    batch: int = 1,
    length: int = 160,
    seed: int = 0,
    temperature: float = 0.8,
    prompt: bytes = PROMPT,
    place=lambda x: x,
) -> str:
    """``prompt`` continued by ``length`` bytes drawn at ``temperature`` from ``model`` (causal,
    byte vocabulary). The model sees a fixed ``[batch, seq_len]`` window (one compilation; later
    positions cannot influence earlier ones), sliding once it is full; ``batch`` copies of the row
    so a sharded model gets a batch it can split; ``place`` puts the window on the mesh."""

    @nnx.jit
    def next_logits(model, tokens, position):
        logits, _ = model(tokens)
        return logits[0, position].astype(jnp.float32)

    text = list(prompt)
    key = jax.random.key(seed)
    for _ in range(length):
        window = text[-seq_len:]
        tokens = np.zeros((batch, seq_len), np.int32)
        tokens[:, : len(window)] = window
        key, draw = jax.random.split(key)
        logits = next_logits(model, place(tokens), len(window) - 1)
        text.append(int(jax.random.categorical(draw, logits / temperature)))
    return bytes(text).decode("utf-8", errors="replace")
