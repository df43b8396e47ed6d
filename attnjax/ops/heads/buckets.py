r"""Attention Buckets: parallel RoPE bases ("Fortify the Shortest Stave in Attention: Enhancing
Context Awareness of Large Language Models for Effective Tool Use", Chen et al., 2023; a reading
of the abstract).

The same model runs ``N`` times in parallel, run ``n`` with rotary position embeddings of base
``theta_n`` (bases chosen so that one run's attention-waveform troughs meet another's peaks), and
the runs' output distributions are combined. The runs fold into the batch (``jax.vmap`` over the
bases: one program, ``N`` times the batch); ``combine="probs"`` averages the probabilities (our
default reading), ``"logits"`` the logits. Both return log-probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def rope(x: Float[Array, "B T H D"], base: float | Array = 10000.0, positions: Array | None = None) -> Array:
    r"""Rotary position embedding (RoFormer, Su et al.) in the half-split layout (GPT-NeoX /
    LLaMA): feature pairs ``(a, a + D/2)`` rotate by ``p * base^(-2a / D)``. ``base`` may be traced
    (one compiled model serves every bucket); ``positions`` default to ``0 .. T - 1``. ``D`` even.

    >>> import jax, jax.numpy as jnp
    >>> q, k = jax.random.normal(jax.random.key(0), (2, 1, 6, 1, 8))
    >>> s = jnp.einsum("bthd,bshd->ts", rope(q), rope(k))
    >>> bool(jnp.allclose(s[1, 3], jnp.einsum("d,d", rope(q, positions=jnp.arange(6) + 4)[0, 1, 0],
    ...                                                 rope(k, positions=jnp.arange(6) + 4)[0, 3, 0]), atol=1e-4))
    True
    """
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"rope needs an even head dim; got x shape {tuple(x.shape)}")
    pos = (
        jnp.arange(x.shape[1], dtype=jnp.float32)
        if positions is None
        else jnp.asarray(positions, jnp.float32)
    )
    inv = jnp.asarray(base, jnp.float32) ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)  # [D/2]
    ang = pos[:, None] * inv[None]  # [T, D/2]
    cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
    x32 = x.astype(jnp.float32)
    a, b = x32[..., : D // 2], x32[..., D // 2 :]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], -1).astype(x.dtype)


def attention_buckets(
    forward: Callable[[Array], Array], bases: Sequence[float] | Array, *, combine: str = "probs"
) -> Array:
    r"""Runs ``forward(base) -> logits [..., V]`` once per RoPE base (vmapped: the buckets fold into
    the batch) and combines the output distributions; returns log-probabilities ``[..., V]``.

    ``combine="probs"``: ``log mean_n softmax(logits_n)``; ``"logits"``: ``log_softmax(mean_n
    logits_n)``. One bucket, or equal bases, give the base model's ``log_softmax(logits)``.

    >>> import jax.numpy as jnp
    >>> import jax
    >>> fwd = lambda base: jnp.stack([base, 2.0 * base]) / 1e4
    >>> bool(jnp.allclose(attention_buckets(fwd, [1e4, 1e4]), jax.nn.log_softmax(jnp.array([1.0, 2.0])), atol=1e-6))
    True
    """
    if combine not in ("probs", "logits"):
        raise ValueError(f"combine must be 'probs' or 'logits'; got {combine!r}")
    bases = jnp.asarray(bases, jnp.float32)
    if bases.ndim != 1 or bases.shape[0] == 0:
        raise ValueError(f"bases must be a non-empty list of RoPE bases; got shape {bases.shape}")
    logits = jax.vmap(forward)(bases).astype(jnp.float32)  # [N, ..., V]
    if combine == "logits":
        return jax.nn.log_softmax(logits.mean(0), -1)
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, -1), axis=0) - jnp.log(bases.shape[0])
