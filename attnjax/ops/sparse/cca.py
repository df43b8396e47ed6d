r"""Core-context-aware attention ("Core Context Aware Attention for Long Context Language
Modeling", Chen et al., 2024; chenyaofo/CCA-Attention).

Tokens form groups of ``g``. Each complete group ``c`` is pooled, per query head, into one core
token weighted by the group's last query:

.. math::

    w_j = \mathrm{softmax}_{j \in G_c}(q_{cg+g-1} \cdot k_j / \sqrt D), \qquad
    \hat k_c = \sum_j w_j k_j, \quad \hat v_c = \sum_j w_j v_j,

and query ``i`` attends with *one* softmax over the core tokens of the groups wholly before its
local window and the local tokens:

.. math::

    n_i = \max(0, \lfloor (i + 1 - s) / g \rfloor), \qquad
    \mathcal C(i) = \{c < n_i\}, \qquad \mathcal L(i) = \{ n_i g \le j \le i \}.

Every key ``j <= i`` is counted exactly once (in a core token or locally); the local window holds
between ``s`` and ``s + g - 1`` tokens. This is the official SDPA path's behaviour; its Triton path
(long inputs) agrees with it only when ``s % g == 0`` (ZOO_SPECS 2.13 note), where the formulas
above reduce to the paper's ``c <= floor((i - (g-1) - s) / g)`` and
``i - (s + (i+1) mod g) < j <= i``.

Both implementations pool with ``ops.attention`` (one query per group, ``O(T D)``), concatenate
the core keys and values before the tokens and call ``ops.attention`` once under this mask: the
reference densely, the xla path blockwise (tiles outside the causal band and the core prefix are
skipped). With grouped-query attention the pooled tokens are per query head, so token keys and
values are repeated to ``H`` heads.

Letter legend: B batch, T = S tokens, H heads, K key/value heads, D head dim, E value dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks, masks
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention


def cca_core_tokens(q, k, v, group: int, *, scale: float | None = None):
    """``(k_core [B, n, H, D], v_core [B, n, H, E])`` of the ``n = floor(T / g)`` complete groups."""
    B, T, H, D = q.shape
    K, E = k.shape[2], v.shape[-1]
    n = T // group
    if n == 0:
        return jnp.zeros((B, 0, H, D), q.dtype), jnp.zeros((B, 0, H, E), q.dtype)
    q_last = q[:, group - 1 : n * group : group].reshape(B * n, 1, H, D)
    kv = jnp.concatenate([k, v], -1)[:, : n * group].reshape(B * n, group, K, D + E)
    pooled = attention(
        q_last, k[:, : n * group].reshape(B * n, group, K, D), kv, scale=scale, implementation="reference"
    )  # [B n, 1, H, D + E]: a g-key softmax per group
    pooled = pooled.reshape(B, n, H, D + E)
    return pooled[..., :D], pooled[..., D:]


def cca_mask(tokens: int, group: int, window: int) -> masks.Mask:
    """The mask over ``[n core tokens | tokens]`` keys (module docstring), ``n = tokens // group``."""
    n = tokens // group

    def fn(b, h, i, j):
        n_i = jnp.maximum(0, (i + 1 - window) // group)
        t = j - n
        return jnp.where(j < n, j < n_i, (t >= n_i * group) & (t <= i))

    return masks.from_fn(fn)


def cca_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K E"],
    *,
    group: int,
    window: int,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    """Causal core-context-aware attention (module docstring).

    Args:
      q, k, v: self-attention ``[B, T, H, D]``, ``[B, T, K, D]``, ``[B, T, K, E]``.
      group: ``g``, tokens per core group.
      window: ``s``, the least number of local tokens (``>= 1``).
      scale: logit scale, default ``1 / sqrt(D)``.
      implementation: ``"reference"`` or ``"xla"`` (of the final ``ops.attention``).

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 20, 2, 8))
    >>> out = ops.cca_attention(q, k, v, group=1, window=3)  # g = 1: exact causal attention
    >>> bool(jnp.allclose(out, ops.attention(q, k, v, is_causal=True), atol=1e-5))
    True
    """
    B, T, S, H, K, D, E = _checks.check_qkv(q, k, v, same_length=True)
    g = _checks.positive_int("group", group)
    s = _checks.positive_int("window", window)
    kc, vc = cca_core_tokens(q, k, v, g, scale=scale)
    rep = lambda x: jnp.repeat(x, H // K, axis=2)
    keys = jnp.concatenate([kc, rep(k)], 1)
    values = jnp.concatenate([vc, rep(v)], 1)
    mask = cca_mask(T, g, s)
    impls = {
        name: (lambda name=name: attention(q, keys, values, mask=mask, scale=scale, implementation=name))
        for name in ("reference", "xla")
    }
    return dispatch.run("cca_attention", impls, implementation)
