r"""Relational attention ("Disentangling and Integrating Relational and Sensory Information in
Transformer Architectures", Altabaa & Lafferty, 2024): heads that return relations, not values.

.. math::

    \alpha_{ij} = \mathrm{softmax}_j(\mathrm{scale}\; q_i \cdot k_j), \quad
    r_{ij} = \big(q^{(l)}_i \cdot k^{(l)}_j\big)_{l = 1..L}, \quad
    \mathrm{RA}(x)_i = \textstyle\sum_j \alpha_{ij} \big(W_r\, r_{ij} + s_j\big)

with ``s_j`` the (projected) symbols of the keys: learned positional symbols or symbolic attention
over a library. The relation term factors through ordinary attention: ``sum_j alpha_ij
r^(l)_ij = q^(l)_i . (sum_j alpha_ij k^(l)_j)``, so one :func:`attnjax.ops.attention` whose values
are ``[s_j, k^(1)_j, ..., k^(L)_j]`` gives both terms exactly, blockwise, with no
``[T, S, L]`` array. The reference writes ``r_ij`` out.

Letter legend: B batch, T queries, S keys, H heads, K key heads, D attention q/k width, L
relations, R relation q/k width, E symbol width.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.core import dispatch
from attnjax.core.blocks import BlockSizes
from attnjax.core.dispatch import Implementation
from attnjax.masks import Mask
from attnjax.ops.attention.api import attention

HI = lax.Precision.HIGHEST


def relational_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    q_rel: Float[Array, "B T H L R"],
    k_rel: Float[Array, "B S K L R"],
    symbols: Float[Array, "B S K E"],
    w_rel: Float[Array, "H L E"],
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T H E"]:
    r"""Relational attention (see the module docstring).

    Args:
      q, k: the attention's queries ``[B, T, H, D]`` and keys ``[B, S, K, D]`` (``K`` divides ``H``).
      q_rel, k_rel: the relations' queries ``[B, T, H, L, R]`` and keys ``[B, S, K, L, R]``.
      symbols: ``s_j`` ``[B, S, K, E]`` (already projected by ``W_s``).
      w_rel: ``W_r`` per head, ``[H, L, E]``.
      mask, scale: as :func:`attnjax.ops.attention` (scale of the attention logits only; the
        relations are plain inner products).
      implementation: ``"reference"`` (dense ``r_ij``), ``"xla"`` (factored, blockwise), ``None``
        or a sequence.

    >>> import jax
    >>> from attnjax import ops
    >>> ks = jax.random.split(jax.random.key(0), 6)
    >>> q, k = (jax.random.normal(kk, (1, 7, 2, 4)) for kk in ks[:2])
    >>> qr, kr = (jax.random.normal(kk, (1, 7, 2, 3, 4)) for kk in ks[2:4])
    >>> s, w = jax.random.normal(ks[4], (1, 7, 2, 5)), jax.random.normal(ks[5], (2, 3, 5))
    >>> out = ops.relational_attention(q, k, qr, kr, s, w)
    >>> ref = ops.relational_attention(q, k, qr, kr, s, w, implementation="reference")
    >>> out.shape, bool(abs(out - ref).max() < 1e-4)
    ((1, 7, 2, 5), True)
    """
    B, T, S, H, K, _, E = _checks.check_qkv(q, k, symbols)
    qs = _checks.check_rank("q_rel", q_rel, ("batch", "q_len", "heads", "relations", "rel_dim"))
    ks = _checks.check_rank("k_rel", k_rel, ("batch", "kv_len", "kv_heads", "relations", "rel_dim"))
    L, R = qs[3], qs[4]
    if qs[:3] != (B, T, H) or ks != (B, S, K, L, R):
        raise ValueError(
            f"q_rel must be [B={B}, T={T}, H={H}, L, R] and k_rel [B={B}, S={S}, K={K}, L, R] with "
            f"one L and R; got {qs} and {ks}"
        )
    if tuple(jnp.shape(w_rel)) != (H, L, E):
        raise ValueError(
            f"w_rel must have shape [heads={H}, relations={L}, symbol_dim={E}]; got {jnp.shape(w_rel)}"
        )
    f32 = lambda x: x.astype(jnp.float32)

    def reference():
        kr = jnp.repeat(f32(k_rel), H // K, axis=2)
        r = jnp.einsum("bthlr,bshlr->bhtsl", f32(q_rel), kr, precision=HI)  # [B, H, T, S, L]
        # alpha through ops.attention: with one-hot values (key j -> e_j) its output is the [T, S]
        # weight matrix itself
        eye = jnp.broadcast_to(jnp.eye(S, dtype=jnp.float32)[None, :, None, :], (B, S, K, S))
        alpha = attention(
            f32(q), f32(k), eye, mask=mask, scale=scale, implementation="reference"
        )  # [B,T,H,S]
        rel = jnp.einsum("bths,bhtsl,hle->bthe", alpha, r, f32(w_rel), precision=HI)
        sym = jnp.einsum("bths,bshe->bthe", alpha, jnp.repeat(f32(symbols), H // K, axis=2), precision=HI)
        return rel + sym

    def factored():
        values = jnp.concatenate([f32(symbols), f32(k_rel).reshape(B, S, K, L * R)], -1)
        o = attention(
            f32(q), f32(k), values, mask=mask, scale=scale, implementation="xla", block_sizes=block_sizes
        )
        sym, kbar = o[..., :E], o[..., E:].reshape(B, T, H, L, R)
        rbar = jnp.einsum("bthlr,bthlr->bthl", f32(q_rel), kbar, precision=HI)  # sum_j alpha_ij r_ij
        return sym + jnp.einsum("bthl,hle->bthe", rbar, f32(w_rel), precision=HI)

    impls = {"reference": reference, "xla": factored}
    return dispatch.run("relational_attention", impls, implementation).astype(q.dtype)
