r"""Multi-variate parallel attention (MVPA; "A foundation model with multi-variate parallel attention
to generate neuronal activity", Carzaniga et al., 2025; official IBM/multi-variate-parallel-transformer
``layers/mvpa.py``, ``MVPFormerGQAAttention._rel_attn``).

Tokens are (time ``t``, channel ``c``) pairs flattened time-major, ``i = t C + c`` (``N = T C``).
The logit of query ``i`` for key ``j`` sums three terms, all scaled by ``1 / sqrt(D)``:

.. math::

    \ell_{ij} = \tfrac{1}{\sqrt D}\Big[\,\mathrm{band}(i, j)\,(q_i + u) \cdot k_j
        + R^t_{i,\, t_i - t_j} + R^c_{i,\, |c_i - c_j|}\Big]

* content, only inside a band of ``|t_i - t_j| <= band`` time steps (zero, not ``-inf``, outside),
  except that queries of the last time step see all keys (the official ``window_mask[-C:] = 1``);
* time-relative ``R^t_{i, d} = (q_i + v) . W_{k,R} R_d`` for time offset ``d`` (the official
  Transformer-XL ``_rel_shift``), a per-query table ``[B, N, H, n_t]``;
* channel-relative ``R^c_{i, e} = (q_i + z) . W_{k,C} E_e`` for channel distance ``e``
  (``_rel_shift_chan``), a per-query table ``[B, N, H, n_c]``;

and keys are visible when ``t_j <= t_i`` (every channel of the current and earlier time steps).
GQA as in :func:`attnjax.ops.attention`. Pass ``q + u`` as ``q`` (the content bias folds into
the queries). The blockwise path is :func:`attnjax.ops.attention` with one score mod reading the
two tables by offset (:mod:`attnjax.score_mods`' C3 trick) and the mask ``causal | chunked(C)``:
no ``[N, N]`` array. The reference writes the dense logits out.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks, masks
from attnjax.core import dispatch
from attnjax.core.blocks import BlockSizes
from attnjax.core.dispatch import Implementation
from attnjax.core.pytree import pytree_dataclass
from attnjax.core.utils import default_scale
from attnjax.ops.attention.api import attention
from attnjax.score_mods import ScoreMod


def _terms(time_table, channel_table, C: int, band: int, n_times: int, scale, q_idx, kv_idx, b, h, score):
    """``band * score + scale (R^t + R^c)`` for index arrays broadcasting to ``score``."""
    N = time_table.shape[1]
    qi = jnp.clip(q_idx, 0, N - 1)
    tq, cq, tk, ck = q_idx // C, q_idx % C, kv_idx // C, kv_idx % C
    inband = (jnp.abs(tq - tk) <= band) | (tq == n_times - 1)
    dt = jnp.clip(tq - tk, 0, time_table.shape[-1] - 1)
    dc = jnp.clip(jnp.abs(cq - ck), 0, channel_table.shape[-1] - 1)
    rel = time_table.astype(jnp.float32)[b, qi, h, dt] + channel_table.astype(jnp.float32)[b, qi, h, dc]
    return jnp.where(inband, score, 0.0) + scale * rel


@pytree_dataclass(data=("time_table", "channel_table"), meta=("channels", "band", "n_times", "scale"))
class MVPAScores(ScoreMod):
    time_table: Array  # [B, N, H, n_t]
    channel_table: Array  # [B, N, H, n_c]
    channels: int
    band: int
    n_times: int
    scale: float

    def __call__(self, q_len, kv_len, score, b, h, q_idx, kv_idx):
        return _terms(
            self.time_table,
            self.channel_table,
            self.channels,
            self.band,
            self.n_times,
            self.scale,
            q_idx,
            kv_idx,
            b,
            h,
            score,
        )


def mvpa_attention(
    q: Float[Array, "B N H D"],
    k: Float[Array, "B N K D"],
    v: Float[Array, "B N K E"],
    time_table: Float[Array, "B N H Nt"],
    channel_table: Float[Array, "B N H Nc"],
    *,
    num_channels: int,
    band: int = 10,
    scale: float | None = None,
    implementation: Implementation = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B N H E"]:
    r"""MVPA over ``N = T C`` time-major tokens (see the module docstring).

    Args:
      q: ``q + u`` ``[B, N, H, D]``; ``k``, ``v``: ``[B, N, K, D]``, ``[B, N, K, E]``.
      time_table: ``(q_i + v) . W_{k,R} R_d`` for time offsets ``d = 0 .. n_t - 1`` (larger offsets
        share the last entry), ``[B, N, H, n_t]``.
      channel_table: ``(q_i + z) . W_{k,C} E_e`` for channel distances ``e = 0 .. n_c - 1``,
        ``[B, N, H, n_c]``.
      num_channels: ``C`` (divides ``N``).
      band: the content band in time steps (the official 10).
      scale: default ``1 / sqrt(D)``, applied to all three terms.
      implementation: ``"reference"`` (dense logits), ``"xla"`` (blockwise with the tables read per
        tile), ``None`` or a sequence.

    >>> import jax
    >>> from attnjax import ops
    >>> ks = jax.random.split(jax.random.key(0), 5)
    >>> q, k, v = (jax.random.normal(kk, (1, 12, 2, 4)) for kk in ks[:3])   # T = 4 steps, C = 3
    >>> rt, rc = jax.random.normal(ks[3], (1, 12, 2, 4)), jax.random.normal(ks[4], (1, 12, 2, 3))
    >>> out = ops.mvpa_attention(q, k, v, rt, rc, num_channels=3, band=1)
    >>> ref = ops.mvpa_attention(q, k, v, rt, rc, num_channels=3, band=1, implementation="reference")
    >>> bool(abs(out - ref).max() < 1e-4)
    True
    """
    B, N, _, H, K, D, _ = _checks.check_qkv(q, k, v, same_length=True)
    C = _checks.positive_int("num_channels", num_channels)
    if N % C:
        raise ValueError(
            f"num_channels={C} must divide the {N} tokens (time-major: N = time steps x channels)"
        )
    for name, t in (("time_table", time_table), ("channel_table", channel_table)):
        shape = _checks.check_rank(name, t, ("batch", "tokens", "heads", "offsets"))
        if shape[:3] != (B, N, H) or shape[3] < 1:
            raise ValueError(
                f"{name} must have shape [batch={B}, tokens={N}, heads={H}, offsets >= 1]; got {shape}"
            )
    s = default_scale(D, scale)
    mask = masks.causal() | masks.chunked(C)  # t_j <= t_i: earlier tokens, or any channel of the same step
    T = N // C

    def reference():
        f32 = lambda x: x.astype(jnp.float32)
        kr = jnp.repeat(f32(k), H // K, axis=2)
        score = jnp.einsum("bihd,bjhd->bhij", f32(q), kr) * s
        ar = jnp.arange(N)
        logits = _terms(
            time_table,
            channel_table,
            C,
            band,
            T,
            s,
            ar[None, None, :, None],
            ar[None, None, None, :],
            jnp.arange(B)[:, None, None, None],
            jnp.arange(H)[None, :, None, None],
            score,
        )
        zq, zk = jnp.zeros((B, N, H, 1), q.dtype), jnp.zeros((B, N, K, 1), q.dtype)
        return attention(zq, zk, v, mask=mask, bias=logits, implementation="reference")

    def blockwise():
        mod = MVPAScores(time_table, channel_table, C, int(band), T, s)
        return attention(
            q, k, v, mask=mask, score_mod=mod, scale=s, implementation="xla", block_sizes=block_sizes
        )

    return dispatch.run("mvpa_attention", {"reference": reference, "xla": blockwise}, implementation)
