r"""DiffQKV ("Sigma: Differential Rescaling of Query, Key and Value for Efficient Language Models",
Lin et al., 2025): keys and values compressed differently.

* fewer key heads than value heads (``K_k < K_v``, both dividing ``H``) and a smaller key head
  dimension than value head dimension: :func:`attnjax.ops.attention` takes ``k [B, S, K_k, D]``
  and ``v [B, S, K_v, E]`` directly (query head ``h`` uses key head ``h // (H / K_k)`` and value
  head ``h // (H / K_v)``);
* selective value fetching: the weights come from the (small) keys alone, and only the values of
  each query's ``n`` highest-scoring keys are read,

  .. math:: o_i = \sum_{j \in \mathrm{top}_n(i)} \frac{e^{s_{ij}}}{\sum_{j'} e^{s_{ij'}}}\, v_j

  (the softmax denominator over all keys, so unselected keys' weight is simply dropped;
  ``renormalize=True`` takes it over the selected keys instead). ``n = S`` is exact attention;
* the augmented query path (a larger query projection before ``d_k``) lives in the module.

The blockwise path runs one query tile at a time: scores from the keys (``O(tile x S x D)``),
top-``n`` selection (no gradient through the choice), the row's log-sum-exp, and a gather of just
``n`` value rows per query (``O(tile x n x E)``). The reference is two dense
:func:`attnjax.ops.attention` calls under the selection mask and without it, combined through their
log-sum-exps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from attnjax import masks
from attnjax.core import dispatch, tiling
from attnjax.core.dispatch import Implementation
from attnjax.core.utils import round_up
from attnjax.masks import Mask
from attnjax.ops.attention.api import attention, make_problem, split_head_counts

HI = lax.Precision.HIGHEST


def _selection(s, n):
    """``[B, H, T, n]`` indices of each row's ``n`` largest scores (no gradient)."""
    return lax.top_k(lax.stop_gradient(s), n)[1]


def diffqkv_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S Kk D"],
    v: Float[Array, "B S Kv E"],
    *,
    value_top_k: int | None = None,
    renormalize: bool = False,
    mask: Mask | None = None,
    scale: float | None = None,
    block_q: int = 64,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    r"""DiffQKV attention (see the module docstring).

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, S, K_k, D]``; ``v``: values ``[B, S, K_v, E]`` (``K_k``, ``K_v`` divide ``H``).
      value_top_k: ``n``, the values read per query; ``None`` reads all (plain attention with
        separate head counts).
      renormalize: softmax over the selected keys instead of over all keys.
      mask, scale: as :func:`attnjax.ops.attention` (masked keys are never selected with weight).
      block_q: query tile of the selective path.
      implementation: ``"reference"`` (dense), ``"xla"`` (query tiles, gathered values), ``None``
        or a sequence.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> ks = jax.random.split(jax.random.key(0), 3)
    >>> q, k = jax.random.normal(ks[0], (1, 9, 4, 8)), jax.random.normal(ks[1], (1, 9, 1, 8))
    >>> v = jax.random.normal(ks[2], (1, 9, 2, 16))          # 1 key head, 2 value heads
    >>> out = ops.diffqkv_attention(q, k, v, value_top_k=3)
    >>> ref = ops.diffqkv_attention(q, k, v, value_top_k=3, implementation="reference")
    >>> out.shape, bool(jnp.abs(out - ref).max() < 1e-5)
    ((1, 9, 4, 16), True)
    """
    if value_top_k is None:
        return attention(q, k, v, mask=mask, scale=scale, implementation=implementation)
    S = k.shape[1] if getattr(k, "ndim", 0) == 4 else 0
    if not isinstance(value_top_k, int) or not 1 <= value_top_k <= max(S, 1):
        raise ValueError(f"value_top_k must be an int in [1, kv_len={S}] or None; got {value_top_k!r}")
    split_head_counts(q, k, v)  # validates the head counts (each dividing H)
    # the scores' problem (q, k, mask): values only shape it, so a one-wide stand-in is enough
    stand_in = jnp.zeros(tuple(k.shape[:3]) + (1,), k.dtype) if getattr(k, "ndim", 0) == 4 else v
    problem = make_problem(q, k, stand_in, mask, None, None, "softmax", None, scale)
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v {tuple(v.shape)} must agree with k {tuple(k.shape)} in [batch, kv_len]")
    n = value_top_k

    def reference():
        s = tiling.logits(
            problem,
            None,
            q.astype(jnp.float32),
            k.astype(jnp.float32),
            None,
            jnp.arange(q.shape[1]),
            jnp.arange(S),
        )
        ok = jnp.broadcast_to(tiling.allowed(problem, jnp.arange(q.shape[1]), jnp.arange(S)), s.shape)
        idx = _selection(jnp.where(ok, s, -jnp.inf), n)
        chosen = (
            jnp.zeros(s.shape, bool)
            .at[
                jnp.arange(s.shape[0])[:, None, None, None],
                jnp.arange(s.shape[1])[None, :, None, None],
                jnp.arange(s.shape[2])[None, None, :, None],
                idx,
            ]
            .set(True)
        )
        sel_mask = masks.dense(chosen) if mask is None else mask & masks.dense(chosen)
        out, lse_sel = attention(
            q, k, v, mask=sel_mask, scale=scale, return_lse=True, implementation="reference"
        )
        if renormalize:
            return out
        _, lse = attention(q, k, v, mask=mask, scale=scale, return_lse=True, implementation="reference")
        ratio = jnp.where(
            jnp.isneginf(lse_sel), 0.0, jnp.exp(lse_sel - jnp.where(jnp.isneginf(lse), 0.0, lse))
        )
        return (out.astype(jnp.float32) * ratio[..., None]).astype(q.dtype)

    def tiled():
        B, T, H, _ = q.shape
        Kv = v.shape[2]
        bq = min(block_q, round_up(T, 8))
        nq = -(-T // bq)
        qp = jnp.pad(q, ((0, 0), (0, nq * bq - T), (0, 0), (0, 0)))
        b_i = jnp.arange(B)[:, None, None, None]
        hv = (jnp.arange(H) // (H // Kv))[None, :, None, None]

        @jax.checkpoint
        def tile(i):
            q_idx = i * bq + jnp.arange(bq)
            q_i = lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=1)
            s = tiling.logits(problem, None, q_i, k, None, q_idx, jnp.arange(S))  # [B, H, bq, S]
            s = jnp.where(tiling.allowed(problem, q_idx, jnp.arange(S)), s, -jnp.inf)
            idx = _selection(s, n)  # [B, H, bq, n]
            s_sel = jnp.take_along_axis(s, idx, -1)
            top = lax.stop_gradient(jnp.max(s, -1, keepdims=True))
            top = jnp.where(jnp.isfinite(top), top, 0.0)
            e_sel = jnp.exp(s_sel - top)
            den = (e_sel if renormalize else jnp.exp(s - top)).sum(-1, keepdims=True)
            w = jnp.where(den > 0, e_sel / jnp.where(den > 0, den, 1.0), 0.0)  # [B, H, bq, n]
            v_sel = v[b_i, idx, hv].astype(jnp.float32)  # [B, H, bq, n, E]: only n rows per query
            return jnp.einsum("bhtn,bhtne->bthe", w, v_sel, precision=HI)

        out = lax.map(tile, jnp.arange(nq))  # [nq, B, bq, H, E]
        return jnp.moveaxis(out, 0, 1).reshape(B, nq * bq, H, -1)[:, :T].astype(q.dtype)

    return dispatch.run("diffqkv_attention", {"reference": reference, "xla": tiled}, implementation)
