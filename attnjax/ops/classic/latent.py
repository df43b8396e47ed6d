r"""Attention as a latent alignment: hard (stochastic) attention and variational attention.

* Show, attend and tell (Xu et al., ICML 2015): soft attention is the expected context
  ``z_t = beta_t sum_i alpha_ti a_i`` (:func:`attnjax.ops.additive_attention` with one query per
  step, ``beta_t = sigmoid(f_beta(h_{t-1}))`` a gate applied by the caller) trained with the
  doubly stochastic penalty ``lambda sum_i (1 - sum_t alpha_ti)^2``
  (:func:`doubly_stochastic_penalty`); hard attention samples a location ``s_t ~
  Multinoulli(alpha_t)``, ``z_t = a_{s_t}`` (:func:`hard_attention`), trained with the score-function
  (REINFORCE) estimator with a moving-average baseline and an entropy bonus
  (:func:`reinforce_surrogate`).
* Latent alignment and variational attention (Deng et al., NeurIPS 2018; harvardnlp/var-attn):
  prior ``p(z | x, q) = softmax(scores)``; the exact marginal ``log p(y) = logsumexp_z(log alpha_z
  + log p(y | x_z))`` is a log-sum-exp over keys, the same reduction as softmax attention with
  ``return_lse``, so :func:`alignment_marginal` computes it blockwise (no ``[T, S]`` array when the
  per-key log-likelihood is a score mod); :func:`categorical_kl` and :func:`alignment_elbo` give
  the ELBO against a posterior (inference network) ``q(z | x, y)``.

Letter legend: B batch, T queries (decoding steps), S keys (locations), H heads, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from attnjax import _checks
from attnjax.core.dispatch import Implementation
from attnjax.masks import Mask
from attnjax.ops.attention.api import attention
from attnjax.score_mods import ScoreMod


def doubly_stochastic_penalty(alpha: Float[Array, "B T S"], weight: float = 1.0) -> Float[Array, " B"]:
    r"""``weight * sum_i (1 - sum_t alpha_ti)^2`` per batch element: encourages every location
    to receive total attention 1 over the ``T`` decoding steps (``alpha`` may have extra head
    axes between, ``[B, T, ..., S]``; they are summed).

    >>> import jax.numpy as jnp
    >>> float(doubly_stochastic_penalty(jnp.eye(3)[None])[0])      # each location gets mass 1
    0.0
    """
    _checks.check_float("alpha", alpha)
    mass = alpha.astype(jnp.float32).sum(1)  # [B, ..., S]
    return weight * ((1.0 - mass) ** 2).reshape(mass.shape[0], -1).sum(-1)


def hard_attention(
    logits: Float[Array, "*N S"], values: Float[Array, "*N S E"], key: PRNGKeyArray
) -> tuple[Float[Array, "*N E"], Int[Array, " *N"], Float[Array, " *N"]]:
    """Hard attention: ``(context, index, log_prob)`` with ``index ~ Categorical(softmax(logits))``,
    ``context = values[index]`` and ``log_prob = log softmax(logits)[index]`` (differentiable
    in ``logits``, for :func:`reinforce_surrogate`). Leading axes broadcast; seeded by ``key``.

    >>> import jax, jax.numpy as jnp
    >>> ctx, idx, lp = hard_attention(jnp.array([0.0, -1e9]), jnp.eye(2), jax.random.key(0))
    >>> ctx.tolist(), int(idx), float(lp)
    ([1.0, 0.0], 0, 0.0)
    """
    if values.shape[:-1] != jnp.broadcast_shapes(values.shape[:-1], logits.shape):
        raise ValueError(f"values {values.shape} must be [*N, S, E] for logits {logits.shape}")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    idx = jax.random.categorical(key, jax.lax.stop_gradient(logp), -1)
    ctx = jnp.take_along_axis(values, idx[..., None, None], -2)[..., 0, :]
    return ctx, idx, jnp.take_along_axis(logp, idx[..., None], -1)[..., 0]


def reinforce_surrogate(
    log_prob: Float[Array, " *N"],
    reward: Float[Array, " *N"],
    baseline: Float[Array, " *N"] | float = 0.0,
    *,
    logits: Float[Array, "*N S"] | None = None,
    entropy_weight: float = 0.0,
) -> Float[Array, ""]:
    r"""A scalar whose gradient is the score-function (REINFORCE) estimator of ``-E[reward]``:
    ``-mean(sg(reward - baseline) * log_prob)``, minus ``entropy_weight`` times the mean entropy
    of ``softmax(logits)`` (the entropy bonus). Add it to the loss; the reward and the baseline
    (a moving average of rewards, kept by the caller) get no gradient here."""
    adv = jax.lax.stop_gradient(jnp.asarray(reward, jnp.float32) - jnp.asarray(baseline, jnp.float32))
    loss = -jnp.mean(adv * log_prob)
    if entropy_weight and logits is not None:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        loss = loss - entropy_weight * jnp.mean(-(jnp.exp(logp) * logp).sum(-1))
    return loss


def alignment_marginal(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    log_lik: Float[Array, "#B #H #T #S"] | ScoreMod,
    *,
    mask: Mask | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H"]:
    r"""The exact marginal ``log p(y_t) = logsumexp_z(log softmax_z(s_tz) + log p(y_t | x_z))``
    with prior scores ``s = scale q k^T`` (under ``mask``): ``lse(s + log_lik) - lse(s)``, two
    ``ops.attention(return_lse=True)`` calls. ``log_lik`` is a bias ``[B, H, T, S]`` or a score
    mod adding it per tile (a pairwise function of ``y_t`` and ``x_z``, no ``[T, S]`` array).
    Returned in ``q.dtype``.

    >>> import jax.numpy as jnp
    >>> q = k = jnp.zeros((1, 1, 1, 2))
    >>> round(float(alignment_marginal(q, jnp.zeros((1, 2, 1, 2)), jnp.log(jnp.array([0.2, 0.6])))[0, 0, 0]), 4)
    -0.9163
    """
    B, _, S, _, K, _, _ = _checks.check_qkv(q, k, k)
    v = jnp.zeros((B, S, K, 1), q.dtype)
    kw = dict(mask=mask, scale=scale, implementation=implementation, return_lse=True)
    if isinstance(log_lik, ScoreMod):
        _, joint = attention(q, k, v, score_mod=log_lik, **kw)
    else:
        _, joint = attention(q, k, v, jnp.asarray(log_lik, jnp.float32), **kw)
    _, prior = attention(q, k, v, **kw)
    return (joint - prior).astype(q.dtype)


def categorical_kl(log_q: Float[Array, "*N S"], log_p: Float[Array, "*N S"]) -> Float[Array, " *N"]:
    """``KL(q || p) = sum_z q_z (log q_z - log p_z)`` from log-probabilities (0 where ``q_z = 0``)."""
    log_q, log_p = log_q.astype(jnp.float32), log_p.astype(jnp.float32)
    qz = jnp.exp(log_q)
    return jnp.where(qz > 0, qz * (log_q - log_p), 0.0).sum(-1)


def alignment_elbo(
    log_q: Float[Array, "*N S"], log_prior: Float[Array, "*N S"], log_lik: Float[Array, "*N S"]
) -> Float[Array, " *N"]:
    r"""The ELBO ``E_q[log p(y | x_z)] - KL(q || p)`` for a categorical alignment, exact (by
    enumeration over ``S``); it equals the marginal when ``q`` is the true posterior."""
    qz = jnp.exp(log_q.astype(jnp.float32))
    return (qz * log_lik.astype(jnp.float32)).sum(-1) - categorical_kl(log_q, log_prior)
