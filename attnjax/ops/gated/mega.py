r"""Mega's pieces ("Mega: Moving Average Equipped Gated Attention", Ma et al., ICLR 2023): the
multi-dimensional damped exponential moving average and the (chunked) single-head attention.

**Damped EMA.** Each of the ``C`` channels is expanded into ``N`` dimensions by ``beta``, each
dimension runs a damped EMA, and ``eta`` projects back:

.. math::

    h_t^{(c)} = \alpha_c \odot \beta_c\, x_{t,c} + (1 - \alpha_c \odot \delta_c) \odot h_{t-1}^{(c)},
    \qquad y_{t,c} = \eta_c^\top h_t^{(c)}

with ``alpha, delta in (0, 1)^N``. Unrolled, this is a causal convolution
``y_{t,c} = sum_{s <= t} K_c[t - s] x_{s,c}`` with kernel
``K_c[j] = sum_n eta_{c,n} alpha_{c,n} beta_{c,n} (1 - alpha_{c,n} delta_{c,n})^j``
(:func:`ema_kernel`), which the efficient path applies by FFT in ``O(C T log T)``; the reference
runs the recurrence step by step (``O(C N T)``, sequential).

**Conventions** (``convention=``). ``"paper"`` (default): ``alpha`` is the weight of the new
input and ``delta`` the damping, as in the equation above. ``"official"``: the parameter names of
the released code (facebookresearch/mega, ``MultiHeadEMA`` as released with the checkpoints),
which are swapped: there ``p = sigmoid(self.delta)`` weighs the input and ``sigmoid(self.alpha)``
damps (``q = 1 - p * sigmoid(self.alpha)``). So with ``"official"`` pass ``alpha =
sigmoid(ema.alpha)`` and ``delta = sigmoid(ema.delta)`` under their own names; the op swaps them.
The rest of an official checkpoint maps as ``beta = ema.beta[..., 0]``,
``eta = ema.gamma * sqrt(1 / N)``; the official layer then adds ``omega * x`` and applies
``silu`` (``silu(EMA(x) + omega * x)``), which is not part of this op.

**Attention.** Mega's attention is single-headed (shared ``Q``/``K`` from the EMA output, see
:class:`attnjax.nn.MegaLayer`); its linear-time variant splits the sequence into chunks of
``c`` and attends within each (``O(T c)``): :func:`mega_attention` is
:func:`attnjax.ops.attention` with ``masks.chunked(c) & masks.causal()``, whose blockwise path
skips every tile outside the chunks.

Letter legend: B batch, T length, C channels, N EMA expansion, H heads, D head dim, E value dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from attnjax import _checks, masks
from attnjax.core import dispatch
from attnjax.ops.attention.api import attention
from attnjax.core.blocks import BlockSizes
from attnjax.core.dispatch import Implementation


def ema_kernel(
    alpha: Float[Array, "C N"], delta: Float[Array, "C N"], beta: Float[Array, "C N"],
    eta: Float[Array, "C N"], length: int,
) -> Float[Array, "C T"]:
    r"""The damped EMA's convolution kernel ``K[c, j] = sum_n eta alpha beta (1 - alpha delta)^j``,
    ``j < length``, float32.

    >>> import jax.numpy as jnp
    >>> one = jnp.ones((1, 1))
    >>> ema_kernel(0.5 * one, one, one, one, 3)  # 0.5 * 0.5^j
    Array([[0.5  , 0.25 , 0.125]], dtype=float32)
    """
    check_ema_rates(alpha, delta)
    alpha, delta, beta, eta = (jnp.asarray(x, jnp.float32) for x in (alpha, delta, beta, eta))
    log_q = jnp.log1p(-alpha * delta)[..., None]  # [C, N, 1]
    # Writing j = R m + r, q^j = q^(R m) q^r turns the C N T powers (exp is the costly part) into
    # C N (T / R + R) exps and one batched matmul over n, with R ~ sqrt(T).
    R = max(1, math.isqrt(length))
    M = -(-length // R)
    # q^0 = 1 also for q = 0 (alpha delta = 1), where log q * 0 would be NaN.
    power = lambda n: jnp.exp(jnp.where(n == 0, 0.0, log_q * n))
    outer = power(R * jnp.arange(M, dtype=jnp.float32))  # [C, N, M]
    inner = power(jnp.arange(R, dtype=jnp.float32))  # [C, N, R]
    weight = (eta * alpha * beta)[..., None]
    kernel = jnp.einsum("cnm,cnr->cmr", weight * outer, inner, precision=lax.Precision.HIGHEST)
    return kernel.reshape(kernel.shape[0], M * R)[:, :length]


def damped_ema(
    x: Float[Array, "B T C"],
    alpha: Float[Array, "C N"],
    delta: Float[Array, "C N"],
    beta: Float[Array, "C N"],
    eta: Float[Array, "C N"],
    *,
    convention: str = "paper",
    implementation: Implementation = None,
) -> Float[Array, "B T C"]:
    r"""Mega's multi-dimensional damped EMA along the sequence (causal; see the module docstring).

    Args:
      x: ``[B, T, C]``.
      alpha, delta: ``[C, N]`` in ``(0, 1]`` (Mega keeps them as ``sigmoid`` of parameters;
        checked when concrete).
      beta: ``[C, N]`` expansion; ``eta``: ``[C, N]`` projection.
      convention: ``"paper"`` or ``"official"`` (``alpha`` and ``delta`` named as the released
        code names them, i.e. swapped; see the module docstring).
      implementation: ``"reference"`` (the recurrence, ``lax.scan`` over ``T``), ``"xla"``
        (FFT convolution with :func:`ema_kernel`, ``O(C T log T)``), ``None`` (the scan on CPU,
        where it is faster; the FFT on accelerators) or a sequence.

    Returns:
      ``[B, T, C]`` in ``x.dtype`` (computed in float32).

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> x = jax.random.normal(jax.random.key(0), (2, 50, 3))
    >>> a, d, b, e = jax.random.uniform(jax.random.key(1), (4, 3, 5), minval=0.1, maxval=0.9)
    >>> out = ops.damped_ema(x, a, d, b, e)
    >>> ref = ops.damped_ema(x, a, d, b, e, implementation="reference")
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
    ((2, 50, 3), True)
    """
    B, T, C = _checks.check_rank("x", x, ("batch", "seq", "channels"))
    _checks.check_float("x", x)
    shape = None
    for name, p in (("alpha", alpha), ("delta", delta), ("beta", beta), ("eta", eta)):
        s = _checks.check_rank(name, p, ("channels", "ema_dim"))
        _checks.check_dim(name, s, 0, C, "channels, as in x")
        if shape is not None and s != shape:
            raise ValueError(f"{name} has shape {s}; alpha, delta, beta and eta must share one shape {shape}")
        shape = s
    if T == 0:
        raise ValueError(f"x must have at least one position; got shape {x.shape}")
    check_ema_rates(alpha, delta)
    if _checks.convention(convention) == "official":
        alpha, delta = delta, alpha  # the official names are swapped relative to the paper
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    params = tuple(map(f32, (alpha, delta, beta, eta)))

    impls = {
        "reference": lambda: _ema_recurrence(f32(x), *params),
        "xla": lambda: _ema_fft(f32(x), *params),
    }
    # On CPU the sequential scan beats the FFT (0.38x at T=4K, 0.31x at 16K: docs/variants.md).
    return dispatch.run("damped_ema", impls, implementation, cpu_order=("reference", "xla")).astype(x.dtype)


def check_ema_rates(alpha, delta) -> None:
    """``alpha`` and ``delta`` must lie in ``(0, 1]`` (checked when concrete; Mega keeps them in
    ``(0, 1)`` as ``sigmoid`` of parameters): outside it the damping ``1 - alpha delta`` leaves
    ``[0, 1)``, so the EMA grows or oscillates instead of decaying (and the FFT kernel's
    ``log(1 - alpha delta)`` is NaN), or it never forgets (``delta = 0``)."""
    for name, x in (("alpha", alpha), ("delta", delta)):
        if isinstance(x, jax.core.Tracer):
            continue
        values = np.asarray(x, np.float32)
        bad = ~((values > 0) & (values <= 1))  # NaN too
        if bad.any():
            raise ValueError(f"{name} must lie in (0, 1] (e.g. sigmoid of a parameter); got "
                             f"{values[bad].ravel()[:4].tolist()} at {int(bad.sum())} of {values.size} entries")


def _ema_recurrence(x, alpha, delta, beta, eta):
    def step(h, x_t):  # h: [B, C, N], x_t: [B, C]
        h = alpha * beta * x_t[..., None] + (1.0 - alpha * delta) * h
        return h, jnp.einsum("bcn,cn->bc", h, eta, precision=lax.Precision.HIGHEST)

    h0 = jnp.zeros((x.shape[0],) + alpha.shape, jnp.float32)
    _, y = lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(y, 0, 1)


def _ema_fft(x, alpha, delta, beta, eta):
    T = x.shape[1]
    kernel = ema_kernel(alpha, delta, beta, eta, T)  # [C, T]
    n = 2 * T  # zero padding to 2T turns the FFT's circular convolution into a linear one
    # FFTs run along the last axis: channels first.
    xf = jnp.fft.rfft(jnp.swapaxes(x, 1, 2), n=n)  # [B, C, n/2+1]
    kf = jnp.fft.rfft(kernel, n=n)  # [C, n/2+1]
    return jnp.swapaxes(jnp.fft.irfft(xf * kf[None], n=n)[..., :T], 1, 2)


def mega_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K E"],
    *,
    chunk_size: int | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    implementation: Implementation = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T H E"]:
    r"""Mega's (chunked) attention: softmax attention within chunks of ``chunk_size``.

    .. math::

        O = \mathrm{softmax}\big(\mathrm{scale}\, Q K^\top + M\big) V, \quad
        M_{ij} = 0 \text{ if } \lfloor i / c \rfloor = \lfloor j / c \rfloor
        \ (\text{and } j \le i \text{ if causal}), \ -\infty \text{ otherwise}

    ``chunk_size=None`` is Mega's full (quadratic) attention; with a chunk it is Mega-chunk,
    ``O(T c)``: the ``"xla"`` path visits only the tiles inside the chunks. Mega itself uses one
    head (``H = 1``); any ``H`` works. The reference is the dense ``[T, T]`` computation.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 40, 1, 8))
    >>> out = ops.mega_attention(q, k, v, chunk_size=16)
    >>> ref = ops.mega_attention(q, k, v, chunk_size=16, implementation="reference")
    >>> bool(jnp.allclose(out, ref, atol=1e-5))
    True
    """
    _checks.check_qkv(q, k, v, same_length=True)
    mask = masks.causal() if is_causal else None
    if chunk_size is not None:
        chunks = masks.chunked(chunk_size)
        mask = chunks if mask is None else chunks & mask
    return attention(q, k, v, mask=mask, scale=scale, implementation=implementation, block_sizes=block_sizes)

