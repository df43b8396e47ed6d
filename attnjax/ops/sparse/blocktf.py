r"""Block Transformer global-to-local attention ("Block Transformer: Global-to-Local Language
Modeling for Fast Inference", Ho et al., NeurIPS 2024), the attention patterns (NNX wiring aside).

The sequence is cut into blocks of ``L_B`` tokens. The *block decoder* (lower layers) is causal
attention over the block embeddings ``e_b = W concat(x_{b L_B}, ..., x_{(b+1) L_B - 1})``
(:func:`block_embed`, then ``ops.attention(is_causal=True)``) and yields context embeddings
``c_b``. The *token decoder* (upper layers, :func:`block_token_attention`) attends, for a token of
block ``b``, over ``[prefix from c_{b-1} | tokens of block b up to itself]``: no cross-block
attention. The efficient path puts blocks in the batch (``[B n, L_B, ...]`` queries over
``[B n, P + L_B, ...]`` keys, bottom-right causal); the reference is one dense-mask attention over
``[all prefixes | all tokens]``.

Letter legend: B batch, T tokens, n blocks, L block length, P prefix length, H heads, K key/value
heads, D head dim, E value dim, C model width.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks, masks
from attnjax.core.dispatch import Implementation


def block_embed(x: Float[Array, "B T C"], w: Float[Array, "LC F"], block: int) -> Float[Array, "B n F"]:
    """Block embeddings ``e_b = concat(x of block b) @ w`` (``T`` a multiple of ``block``)."""
    B, T, C = _checks.check_rank("x", x, ("batch", "tokens", "width"))
    block = _checks.positive_int("block", block)
    if T % block:
        raise ValueError(f"block_embed needs tokens T={T} to be a multiple of block={block}")
    if w.ndim != 2 or w.shape[0] != block * C:
        raise ValueError(f"w has shape {w.shape}; expected [block * width = {block * C}, F]")
    return jnp.asarray(x).reshape(B, T // block, block * C) @ w


def _check(q, k, v, block, prefix_k, prefix_v):
    B, T, S, H, K, D, E = _checks.check_qkv(q, k, v, same_length=True)
    block = _checks.positive_int("block", block)
    if T % block:
        raise ValueError(f"block_token_attention needs T={T} to be a multiple of block={block}")
    n = T // block
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together")
    P = 0
    if prefix_k is not None:
        pk = _checks.check_rank("prefix_k", prefix_k, ("batch", "blocks", "prefix", "kv_heads", "head_dim"))
        pv = _checks.check_rank("prefix_v", prefix_v, ("batch", "blocks", "prefix", "kv_heads", "value_dim"))
        P = pk[2]
        if pk != (B, n, P, K, D) or pv != (B, n, P, K, E):
            raise ValueError(
                f"prefix_k/prefix_v have shapes {pk}/{pv}; expected [B={B}, blocks={n}, P, K={K}, D={D}|E={E}]"
            )
    return B, T, H, K, D, E, n, P, block


def block_token_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K E"],
    block: int,
    *,
    prefix_k: Float[Array, "B n P K D"] | None = None,
    prefix_v: Float[Array, "B n P K E"] | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    """Token-decoder attention: each token attends its block's prefix and the earlier tokens of
    its own block only.

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, T, K, D]``, ``[B, T, K, E]``, ``T`` a multiple of ``block``.
      block: ``L_B``, tokens per block.
      prefix_k, prefix_v: per-block prefix keys/values ``[B, n, P, K, D|E]`` (projected from
        ``c_{b-1}``; always visible to block ``b``); none: plain block-local causal attention.
      implementation: ``"reference"`` (dense mask over ``[prefixes | tokens]``) or the blocks-as-batch
        path of :func:`attnjax.ops.attention` (any other value is passed to it).

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 8, 2, 4))
    >>> out = ops.block_token_attention(q, k, v, 8)  # one block, no prefix: causal attention
    >>> bool(jnp.allclose(out, ops.attention(q, k, v, is_causal=True), atol=1e-5))
    True
    """
    from attnjax.ops import attention

    B, T, H, K, D, E, n, P, L = _check(q, k, v, block, prefix_k, prefix_v)
    if implementation == "reference":
        kk, vv = k, v
        if P:
            kk = jnp.concatenate([prefix_k.reshape(B, n * P, K, D).astype(k.dtype), k], axis=1)
            vv = jnp.concatenate([prefix_v.reshape(B, n * P, K, E).astype(v.dtype), v], axis=1)
        t = jnp.arange(T)
        pre = (jnp.arange(n * P)[None, :] // max(P, 1)) == (t // L)[:, None]
        tok = ((t[None, :] // L) == (t // L)[:, None]) & (t[None, :] <= t[:, None])
        allowed = jnp.concatenate([pre, tok], axis=1)[None, None]
        return attention(q, kk, vv, mask=masks.dense(allowed), scale=scale, implementation="reference")
    qb = q.reshape(B * n, L, H, D)
    kb, vb = k.reshape(B * n, L, K, D), v.reshape(B * n, L, K, E)
    if P:
        kb = jnp.concatenate([prefix_k.reshape(B * n, P, K, D).astype(k.dtype), kb], axis=1)
        vb = jnp.concatenate([prefix_v.reshape(B * n, P, K, E).astype(v.dtype), vb], axis=1)
    out = attention(qb, kb, vb, mask=masks.causal(), scale=scale, implementation=implementation)
    return out.reshape(B, T, H, E)
