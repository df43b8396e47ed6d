r"""Adaptive filter attention, isotropic form ("Attention as an Adaptive Filter", Racioppo, 2025;
a reading of the paper's isotropic simplification, not checked against code: none was found).

Tokens are noisy observations of a linear SDE whose dynamics are diagonal in a complex basis,
``lambda = -a + i omega``: feature pairs ``(x_p, x_{p + D/2})`` are the real and imaginary parts of
``D/2`` complex coordinates, each with its own frequency ``omega_{h,p}``, and a per-head decay
``a_h >= 0``. Key ``j`` propagated to the time of query ``i`` (``d = t_i - t_j``) is
``k^_ij = e^{-a d} R(omega d) k_j``; its precision is

.. math:: P(d) = 1 \Big/ \Big(\sigma_Q^2\, \frac{1 - e^{-2 a d}}{2 a} + \sigma_R^2\, e^{-2 a d}\Big)

(process noise ``sigma_Q``, measurement noise ``sigma_R``; ``(1 - e^{-2ad}) / 2a -> d`` as
``a -> 0``), and

.. math::

    w_{ij} = \mathrm{softmax}_j\big(\mathrm{scale}\; q_i \cdot k^_{ij} + \log P(|d|)\big), \qquad
    o_i = \textstyle\sum_j w_{ij}\, e^{-a d} R(\omega d)\, v_j .

The paper's robust residual reweighting is left out (the isotropic, dot-product reading).
Everything factors: ``q_i . R(omega d) k_j = R(-omega t_i) q_i . R(-omega t_j) k_j`` (rotary
encodings), ``e^{-a d}`` multiplies the score and ``log P`` adds to it (one score mod of ``d``),
and the values' factor splits as ``R(omega t_i) sum_j w_ij e^{-a d} [R(-omega t_j) v_j]`` with
``sum_j w_ij e^{-a d} u_j = softmax(l - a d) u * exp(lse(l - a d) - lse(l))``: two blockwise
:func:`attnjax.ops.attention` calls, merged by their log-sum-exps. Zero decay and process noise
with ``sigma_R = 1`` is rotary attention with values in the rotating frame. The reference writes
the complex propagation of every pair out.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from attnjax import _checks, masks, score_mods
from attnjax.core import dispatch
from attnjax.core.blocks import BlockSizes
from attnjax.core.dispatch import Implementation
from attnjax.core.utils import default_scale
from attnjax.ops.attention.api import attention


def rotate(x: Float[Array, "B T H D"], angles: Float[Array, "T H P"]) -> Float[Array, "B T H D"]:
    """Multiplies the complex coordinates ``x_p + i x_{p + D/2}`` by ``e^{i angles}`` (float32)."""
    P = x.shape[-1] // 2
    a, b = x[..., :P].astype(jnp.float32), x[..., P:].astype(jnp.float32)
    c, s = jnp.cos(angles)[None], jnp.sin(angles)[None]
    return jnp.concatenate([a * c - b * s, a * s + b * c], -1)


def log_precision(d: Array, decay: Array, sigma_q: Array, sigma_r: Array) -> Array:
    """``log P(d)`` for lags ``d >= 0`` (broadcasting), finite at ``decay = 0``."""
    a = jnp.maximum(decay, 0.0)
    e = jnp.exp(-2.0 * a * d)
    # (1 - e^{-2ad}) / (2a), with its a -> 0 limit d
    growth = jnp.where(a * d > 1e-6, -jnp.expm1(-2.0 * a * d) / jnp.where(a > 0, 2.0 * a, 1.0), d)
    return -jnp.log(sigma_q**2 * growth + sigma_r**2 * e)


def _lag_mod(decay, sigma_q, sigma_r, with_precision: bool, extra_decay: bool):
    """Score mod of the lag ``d = q_idx - kv_idx`` (bottom-right aligned): ``s e^{-a d} (+ log P(d))
    (- a d)``; its parameters get gradients."""

    def fn(p, score, b, h, q_idx, kv_idx):
        a, sq, sr = (jnp.asarray(x, jnp.float32)[h] for x in p)
        d = jnp.abs(q_idx - kv_idx).astype(jnp.float32)
        out = score * jnp.exp(-jnp.maximum(a, 0.0) * d)
        if with_precision:
            out = out + log_precision(d, a, sq, sr)
        if extra_decay:
            out = out - jnp.maximum(a, 0.0) * d
        return out

    return score_mods.from_fn(fn, (decay, sigma_q, sigma_r))


def adaptive_filter_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K D"],
    *,
    frequency: Float[Array, "H P"],
    decay: Float[Array, "H"],
    sigma_process: Float[Array, "H"],
    sigma_measure: Float[Array, "H"],
    is_causal: bool = True,
    scale: float | None = None,
    implementation: Implementation = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T H D"]:
    r"""Adaptive filter attention, isotropic form (see the module docstring).

    Args:
      q, k, v: ``[B, T, H, D]``, ``[B, T, K, D]``, ``[B, T, K, D]`` (``D`` even: ``D/2`` complex
        coordinates; values share the keys' dynamics, so ``E = D``); self-attention, positions
        ``0 .. T - 1``.
      frequency: ``omega`` ``[H, D/2]``; ``decay``: ``a >= 0`` ``[H]`` (negative values count as 0);
        ``sigma_process``, ``sigma_measure``: ``[H]``. All get gradients.
      is_causal: queries see keys ``j <= i`` (the filter); otherwise lags are ``|i - j|`` both ways.
      scale: content logit scale, default ``1 / sqrt(D)``.
      implementation: ``"reference"`` (dense complex propagation), ``"xla"`` (two blockwise
        attentions), ``None`` or a sequence.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 10, 2, 4))
    >>> kw = dict(frequency=jnp.full((2, 2), 0.3), decay=jnp.array([0.1, 0.0]),
    ...           sigma_process=jnp.array([0.5, 0.2]), sigma_measure=jnp.ones(2))
    >>> out = ops.adaptive_filter_attention(q, k, v, **kw)
    >>> ref = ops.adaptive_filter_attention(q, k, v, implementation="reference", **kw)
    >>> bool(jnp.abs(out - ref).max() < 1e-4)
    True
    """
    _, T, _, H, K, D, E = _checks.check_qkv(q, k, v, same_length=True)
    if D % 2 or E != D:
        raise ValueError(f"q, k, v need one even head dim (D/2 complex coordinates); got D={D}, E={E}")
    params = {
        "frequency": (frequency, (H, D // 2)),
        "decay": (decay, (H,)),
        "sigma_process": (sigma_process, (H,)),
        "sigma_measure": (sigma_measure, (H,)),
    }
    for name, (x, shape) in params.items():
        if tuple(jnp.shape(x)) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}; got {list(jnp.shape(x))}")
    s = default_scale(D, scale)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    omega, a, sq, sr = f32(frequency), f32(decay), f32(sigma_process), f32(sigma_measure)
    mask = masks.causal() if is_causal else None

    def reference():
        t = jnp.arange(T, dtype=jnp.float32)
        d = t[:, None] - t[None, :]  # [T, S]
        ad = jnp.abs(d)
        kr, vr = (jnp.repeat(f32(x), H // K, axis=2) for x in (k, v))
        cplx = lambda x: x[..., : D // 2] + 1j * x[..., D // 2 :]
        # e^{lambda d} for every pair and head: [H, T, S, D/2]
        prop = jnp.exp(
            -jnp.maximum(a, 0.0)[:, None, None, None] * ad[None, :, :, None]
            + 1j * omega[:, None, None, :] * d[None, :, :, None]
        )
        k_hat = prop[None] * cplx(kr).transpose(0, 2, 1, 3)[:, :, None]  # [B, H, T, S, D/2]
        v_hat = prop[None] * cplx(vr).transpose(0, 2, 1, 3)[:, :, None]
        qc = cplx(f32(q)).transpose(0, 2, 1, 3)[:, :, :, None]  # [B, H, T, 1, D/2]
        content = jnp.real(jnp.conj(qc) * k_hat).sum(-1) * s  # the real inner product of the pairs
        logits = (
            content + log_precision(ad[None], a[:, None, None], sq[:, None, None], sr[:, None, None])[None]
        )
        if is_causal:
            logits = jnp.where(d[None, None] >= 0, logits, -jnp.inf)
        w = jnp.exp(logits - logits.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        o = (w[..., None] * v_hat).sum(3)  # [B, H, T, D/2] complex
        out = jnp.concatenate([jnp.real(o), jnp.imag(o)], -1).transpose(0, 2, 1, 3)
        return out.astype(q.dtype)

    def blockwise():
        t = jnp.arange(T, dtype=jnp.float32)
        ang = t[:, None, None] * omega[None]  # [T, H, D/2]
        # each query head rotates with its own frequencies, so key/value heads are repeated to H
        rep = lambda x: x if K == H else jnp.repeat(x, H // K, axis=2)
        qr, kr, vr = rotate(q, -ang), rotate(rep(k), -ang), rotate(rep(v), -ang)
        kw = {"mask": mask, "scale": s, "implementation": "xla", "block_sizes": block_sizes, "return_lse": True}
        _, lse = attention(qr, kr, vr, score_mod=_lag_mod(a, sq, sr, True, False), **kw)
        num, lse_d = attention(qr, kr, vr, score_mod=_lag_mod(a, sq, sr, True, True), **kw)
        out = num.astype(jnp.float32) * jnp.exp(lse_d - lse)[..., None]
        return rotate(out, ang).astype(q.dtype)

    return dispatch.run(
        "adaptive_filter_attention", {"reference": reference, "xla": blockwise}, implementation
    )
