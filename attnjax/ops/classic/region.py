r"""Region attention and reference-concept scaling (zoo 4.16).

* R-MSA (Region Attention Transformer for medical image restoration): each pixel carries a
  region id (from SAM) and attends only within its region: ``masks.document(region_ids)``. For
  tile skipping, :func:`region_attention` sorts tokens by a stable sort of their ids first (regions
  become contiguous: a block-diagonal mask whose empty tiles are skipped), attends, and
  un-permutes; the result is the same.
* Isolation attention (IR-Diffusion): :func:`attnjax.masks.isolation`.
* MRSA (FreeCustom, a reading): the generated image's queries attend over its own tokens and the
  reference concept images' tokens; reference tokens outside each concept's mask are masked and
  the scores of the in-mask reference tokens are multiplied by ``w > 1``:
  :func:`reference_scaling` (a score mod) with :func:`attnjax.masks.dense` on the key mask.

Letter legend: B batch, T tokens, S keys, H heads, D head dim, E value dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from attnjax import _checks, masks, score_mods
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention


def region_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K E"],
    region_ids: Int[Array, "B T"],
    *,
    scale: float | None = None,
    permute: bool = True,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    """Self-attention within regions: token ``i`` sees token ``j`` iff ``region_ids`` agree. With
    ``permute`` the tokens are stably sorted by region first (contiguous regions: tiles between
    different regions are skipped) and the output is put back in the original order.

    >>> import jax.numpy as jnp
    >>> q = k = jnp.zeros((1, 4, 1, 1)); v = jnp.arange(4.0).reshape(1, 4, 1, 1)
    >>> region_attention(q, k, v, jnp.array([[0, 1, 0, 1]]))[0, :, 0, 0]   # region means
    Array([1., 2., 1., 2.], dtype=float32)
    """
    B, T, _, _, _, _, _ = _checks.check_qkv(q, k, v, same_length=True)
    region_ids = jnp.asarray(region_ids)
    _checks.check_int_array("region_ids", region_ids)
    if region_ids.shape != (B, T):
        raise ValueError(f"region_ids must be [batch={B}, len={T}]; got {region_ids.shape}")
    if not permute:
        return attention(q, k, v, mask=masks.document(region_ids), scale=scale, implementation=implementation)
    order = jnp.argsort(region_ids, axis=1, stable=True)
    gather = lambda x: jnp.take_along_axis(x, order[:, :, None, None], 1)
    ids = jnp.take_along_axis(region_ids, order, 1)
    out = attention(
        gather(q), gather(k), gather(v), mask=masks.document(ids), scale=scale, implementation=implementation
    )
    inverse = jnp.argsort(order, axis=1)
    return jnp.take_along_axis(out, inverse[:, :, None, None], 1)


def reference_scaling(in_mask: Bool[Array, "B S"], weight: float | Float[Array, ""]) -> score_mods.ScoreMod:
    """MRSA's score mod: scores of the keys flagged ``in_mask`` (the reference tokens inside their
    concept's mask) are multiplied by ``weight`` (learnable: a score-mod parameter)."""
    in_mask = jnp.asarray(in_mask, bool)
    if in_mask.ndim != 2:
        raise ValueError(f"in_mask must be [batch, kv_len]; got shape {in_mask.shape}")

    def fn(params, score, b, h, q_idx, kv_idx):
        flags, w = params
        hit = flags[b, jnp.clip(kv_idx, 0, flags.shape[1] - 1)]
        return jnp.where(hit, score * w, score)

    return score_mods.from_fn(fn, (in_mask, jnp.asarray(weight, jnp.float32)))
