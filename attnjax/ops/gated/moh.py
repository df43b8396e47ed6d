r"""Mixture-of-head attention ("MoH: Multi-Head Attention as Mixture-of-Head Attention",
Jin et al., 2024).

Heads are experts. The first ``H_s`` heads are *shared* (always on); each token routes to the
``top_k`` best of the remaining ``H_r = H - H_s`` *routed* heads. Head outputs are weighted by
per-token gates instead of summed uniformly:

.. math::

    O_t = \sum_h g_{t,h}\, \mathrm{Attn}_h(Q, K, V)_t, \qquad
    g_{t,h} = \begin{cases}
      \alpha_{t,1}\, \mathrm{softmax}(r^s_t)_h & h \text{ shared} \\
      \alpha_{t,2}\, \mathrm{softmax}(r^r_t)_h & h \text{ routed, in } \mathrm{TopK}(r^r_t) \\
      0 & \text{otherwise}
    \end{cases}

with ``alpha_t = softmax(r^m_t)`` (two entries) balancing shared and routed heads. The op
returns the gated head outputs ``g_{t,h} Attn_h(...)_t`` as ``[B, T, H, E]``; the caller's output
projection sums them over heads (``sum_h g_h H^h W_O^h``, the paper's equation 4).

**Load balance.** ``aux_loss = sum_{h routed} f_h P_h`` (the paper's equation 5) with ``f_h``
the fraction of tokens that selected head ``h`` and ``P_h`` the mean routing probability
``softmax(r^r)_h`` over tokens (``B * T`` of them). It is ``top_k / H_r`` when routing is
uniform; add it to the training loss with a small weight (the paper uses 0.01).

**Conventions** (``convention=``). ``"paper"`` (default) is the equations above.
``"official"`` is the released code (SkyworkAI/MoH, ``MoH-ViT``/``MoH-LLaMA3``), which differs:
routed gates are renormalized over the ``top_k`` kept heads and scaled by ``top_k``
(``g_routed = top_k * p * 1[sel] / max(sum_sel p, eps)``), shared gates are scaled by ``H_s``
(``H_s softmax(r^s)``, or ``H_s`` per head without shared logits), ``alpha`` by 2
(``2 softmax(r^m)``), and the auxiliary loss is ``H_r * sum_h f_h P_h`` (its
``mean(f * P) * H_r^2``), which is 1 (not ``top_k / H_r``) for uniform routing. Use it to run
MoH checkpoints: the two forms give different outputs for the same router weights.

**Skipping unselected heads** (``skip_unselected=True``). Queries are cut into blocks of
``block_q`` rows; for every (batch element, query block, head) whose gates are all zero (no token
of the block selected the head), the head's attention for that block is not computed (a
``lax.cond`` inside a ``lax.map``, so neither the forward nor the backward pass does the work) and
gives zeros, which is exactly what the gate multiplies it by. The result is the same as the dense
path up to float rounding; it pays when routing is sparse at block granularity (small blocks,
few routed heads per token). Each (b, block, head) attention sees the mask through a wrapper that
shifts query positions to the block's place in the sequence (bottom-right alignment is kept
against the full query length); positional masks keep their tile skipping, content masks
(``document``, ``from_fn``) are evaluated densely per tile. ``bias`` and ``score_mod`` are not
supported on this path.

Letter legend: B batch, T query length, S key length, H heads (H_s shared + H_r routed),
K key/value heads, D head dim, E value head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.masks import Mask
from attnjax.core import Shard
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention


class MoHOutput(NamedTuple):
    """What :func:`moh_attention` returns."""

    out: Float[Array, "B T H E"]
    """Gated head outputs ``g[b, t, h] * Attn_h(...)[b, t]``; sum over heads after ``W_O``."""
    aux_loss: Float[Array, ""]
    """The load-balance loss ``sum_h f_h P_h`` over routed heads (float32 scalar)."""
    gates: Float[Array, "B T H"]
    """The per-token head gates (float32; zero for routed heads a token did not select)."""


def moh_gates(
    routed_logits: Float[Array, "B T Hr"],
    top_k: int,
    shared_logits: Float[Array, "B T Hs"] | None = None,
    mix_logits: Float[Array, "B T 2"] | None = None,
    num_shared: int = 0,
    convention: str = "paper",
) -> tuple[Float[Array, "B T H"], Float[Array, ""]]:
    """The gates ``g [B, T, H_s + H_r]`` (shared heads first) and the load-balance loss.

    ``convention="paper"``: shared gates are ``softmax(shared_logits)`` (ones if
    ``shared_logits`` is None); routed gates ``softmax(routed_logits)`` kept on the ``top_k``
    largest (not renormalized, as in the paper); ``mix_logits`` (softmax over its two entries)
    scales shared and routed gates; aux ``sum_h f_h P_h``. ``convention="official"``: the
    released code's gates and loss (see the module docstring).
    """
    official = _checks.convention(convention) == "official"
    p = jax.nn.softmax(routed_logits.astype(jnp.float32), axis=-1)  # [B, T, Hr]
    hr = p.shape[-1]
    _, idx = lax.top_k(routed_logits.astype(jnp.float32), top_k)
    selected = jax.nn.one_hot(idx, hr, dtype=jnp.float32).sum(-2)  # [B, T, Hr] in {0, 1}
    g_routed = p * selected
    if official:  # renormalized over the kept heads (the sum clamped at eps), times top_k
        kept = jnp.maximum(g_routed.sum(-1, keepdims=True), jnp.finfo(jnp.float32).eps)
        g_routed = g_routed / kept * top_k
    if num_shared:
        if shared_logits is None:
            g_shared = jnp.ones((*p.shape[:-1], num_shared), jnp.float32)
        else:
            g_shared = jax.nn.softmax(shared_logits.astype(jnp.float32), axis=-1)
        if official:
            g_shared = g_shared * num_shared
    else:
        g_shared = jnp.zeros((*p.shape[:-1], 0), jnp.float32)
    if mix_logits is not None:
        alpha = jax.nn.softmax(mix_logits.astype(jnp.float32), axis=-1) * (2.0 if official else 1.0)
        g_shared, g_routed = g_shared * alpha[..., :1], g_routed * alpha[..., 1:]
    f = selected.reshape(-1, hr).mean(0)  # fraction of tokens choosing each head (no gradient)
    P = p.reshape(-1, hr).mean(0)
    aux = jnp.sum(lax.stop_gradient(f) * P) * (hr if official else 1.0)
    return jnp.concatenate([g_shared, g_routed], axis=-1), aux


def moh_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    routed_logits: Float[Array, "B T Hr"],
    *,
    top_k: int,
    shared_logits: Float[Array, "B T Hs"] | None = None,
    mix_logits: Float[Array, "B T 2"] | None = None,
    mask: Mask | None = None,
    skip_unselected: bool = False,
    block_q: int = 64,
    convention: str = "paper",
    implementation: Implementation = None,
    **attention_kwargs,
) -> MoHOutput:
    r"""Mixture-of-head attention: per-token top-k routing over heads, plus shared heads.

    See the module docstring for the equations. Heads ``0 .. H_s - 1`` are shared and
    ``H_s .. H - 1`` routed, with ``H_r = routed_logits.shape[-1]`` and ``H_s = H - H_r``.

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, S, K, D]`` (``K`` divides ``H``).
      v: values ``[B, S, K, E]``.
      routed_logits: router logits over the routed heads, ``[B, T, H_r]``.
      top_k: how many routed heads each token uses, ``1 <= top_k <= H_r``.
      shared_logits: router logits over the shared heads, ``[B, T, H_s]``; None gives weight 1.
      mix_logits: ``[B, T, 2]`` logits balancing shared (entry 0) and routed (entry 1) heads.
      mask: an :mod:`attnjax.masks` mask (bottom-right aligned, as in :func:`attention`).
      skip_unselected: skip (batch element, query block, head) triples that no token selected.
      block_q: the query block size of ``skip_unselected``.
      convention: ``"paper"`` (the paper's gates and loss) or ``"official"`` (the released
        code's: renormalized, scaled gates; see the module docstring).
      implementation: passed to :func:`attnjax.ops.attention`.
      **attention_kwargs: more arguments of :func:`attnjax.ops.attention` (``scale``,
        ``normalizer``, ``block_sizes``; ``bias`` and ``score_mod`` only without skipping).

    Returns:
      :class:`MoHOutput` ``(out [B, T, H, E] in q.dtype, aux_loss, gates [B, T, H])``.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import masks, ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 32, 6, 8))
    >>> logits = jax.random.normal(jax.random.key(1), (1, 32, 4))  # 2 shared + 4 routed heads
    >>> dense = ops.moh_attention(q, k, v, logits, top_k=2, mask=masks.causal())
    >>> sparse = ops.moh_attention(q, k, v, logits, top_k=2, mask=masks.causal(),
    ...                            skip_unselected=True, block_q=8)
    >>> dense.out.shape, bool(jnp.allclose(dense.out, sparse.out, atol=1e-5))
    ((1, 32, 6, 8), True)
    """
    B, T, H, D = _checks.check_rank("q", q, ("batch", "q_len", "heads", "head_dim"))
    rshape = _checks.check_rank("routed_logits", routed_logits, ("batch", "q_len", "routed_heads"))
    _checks.check_float("routed_logits", routed_logits)
    if rshape[:2] != (B, T):
        raise ValueError(f"routed_logits has shape {rshape}; its first two axes must be q's [batch={B}, q_len={T}]")
    hr = rshape[2]
    if not 1 <= hr <= H:
        raise ValueError(f"routed_logits has {hr} routed heads (shape {rshape}); expected 1 .. H={H}")
    hs = H - hr
    top_k = _checks.positive_int("top_k", top_k)
    if top_k > hr:
        raise ValueError(f"top_k={top_k} must be <= the number of routed heads H_r={hr}")
    if shared_logits is not None:
        _checks.check_rank("shared_logits", shared_logits, ("batch", "q_len", "shared_heads"))
        if shared_logits.shape != (B, T, hs):
            raise ValueError(f"shared_logits has shape {shared_logits.shape}; expected [batch={B}, q_len={T}, shared_heads={hs}]")
    if mix_logits is not None:
        _checks.check_rank("mix_logits", mix_logits, ("batch", "q_len", "2"))
        if mix_logits.shape != (B, T, 2):
            raise ValueError(f"mix_logits has shape {mix_logits.shape}; expected [batch={B}, q_len={T}, 2]")
        if hs == 0:
            raise ValueError("mix_logits balances shared and routed heads, but there are no shared heads")
    block_q = _checks.positive_int("block_q", block_q)

    gates, aux = moh_gates(routed_logits, top_k, shared_logits, mix_logits, num_shared=hs,
                           convention=_checks.convention(convention))
    if skip_unselected:
        if attention_kwargs.get("bias") is not None:
            raise NotImplementedError("moh_attention(skip_unselected=True) does not support bias=")
        heads = _skipping_heads(q, k, v, gates, mask, block_q, implementation, attention_kwargs)
    else:
        heads = attention(q, k, v, mask=mask, implementation=implementation, **attention_kwargs)
    out = (heads.astype(jnp.float32) * gates[..., None]).astype(q.dtype)
    return MoHOutput(out, aux, gates)


def _skipping_heads(q, k, v, gates, mask, block_q, implementation, attention_kwargs):
    """Per-head attention outputs ``[B, T, H, E]``, zero where a (b, block, head) is unselected."""
    B, T, H, D = q.shape
    S, K, E = k.shape[1], k.shape[2], v.shape[3]
    if mask is not None:
        if not isinstance(mask, Mask):
            raise TypeError(f"mask must be an attnjax.masks mask or None; got {type(mask).__name__}")
        mask.check(B, H, T, S)
    bq = min(block_q, T)
    nq = -(-T // bq)
    pad = nq * bq - T
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    gp = jnp.pad(gates, ((0, 0), (0, pad), (0, 0)))
    # needed[b, i, h]: does any token of query block i (batch b) give head h a nonzero gate?
    needed = (gp.reshape(B, nq, bq, H) != 0).any(2)

    def one(item):
        b, i, h = item
        q_blk = lax.dynamic_slice(qp, (b, i * bq, h, 0), (1, bq, 1, D))
        k_h = lax.dynamic_slice(k, (b, 0, h // (H // K), 0), (1, S, 1, D))
        v_h = lax.dynamic_slice(v, (b, 0, h // (H // K), 0), (1, S, 1, E))
        # This (batch element, query block, head) is a piece of the whole problem: masks, score
        # mods and dropout see its global indices.
        shard = Shard.make(batch=B, heads=H, q_len=T, kv_len=S, batch_offset=b, head_offset=h, q_offset=i * bq)

        def compute(_):
            out = attention(q_blk, k_h, v_h, mask=mask, shard=shard, implementation=implementation,
                            **attention_kwargs)
            return out[0, :, 0]  # [bq, E]

        return lax.cond(needed[b, i, h], compute, lambda _: jnp.zeros((bq, E), q.dtype), None)

    b, i, h = jnp.meshgrid(*(jnp.arange(n, dtype=jnp.int32) for n in (B, nq, H)), indexing="ij")
    outs = lax.map(one, (b.ravel(), i.ravel(), h.ravel()))  # [B * nq * H, bq, E]
    outs = outs.reshape(B, nq, H, bq, E).transpose(0, 1, 3, 2, 4).reshape(B, nq * bq, H, E)
    return outs[:, :T]
