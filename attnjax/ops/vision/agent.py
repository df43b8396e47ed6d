r"""Agent attention ("Agent Attention: On the Integration of Softmax and Linear Attention",
Han et al., ECCV 2024).

A small set of ``N`` agent tokens ``A`` (typically pooled queries) first gathers from the keys,
then broadcasts back to the queries:

.. math::

    V_A = \mathrm{softmax}(\mathrm{scale}\; A K^\top + B_A)\, V, \qquad
    O = \mathrm{softmax}(\mathrm{scale}\; Q A^\top + B_Q)\, V_A

Two softmax attentions of sizes ``[N, S]`` and ``[T, N]``: cost ``O((T + S) N)``, linear in
sequence length like linear attention, and never a ``[T, S]`` score matrix. Both steps call
:func:`attnjax.ops.attention`, so they get its blockwise XLA path (and the Pallas kernel when it
lands) and its custom backward.

Letter legend: B batch, T query length, S key length, H query heads, K key/value heads (divides
H), D head dim, E value head dim, N agents.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attnjax import _checks
from attnjax.core import dispatch
from attnjax.core.utils import precision
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention, make_problem
from attnjax.core.utils import default_scale


def agent_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K E"],
    agents: Float[Array, "B N H D"],
    *,
    agent_bias: Float[Array, "#B #H N S"] | None = None,
    query_bias: Float[Array, "#B #H T N"] | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"]:
    r"""Agent attention: keys -> agents -> queries, two softmax attentions through ``N`` agents.

    .. math::

        V_A = \mathrm{softmax}(\mathrm{scale}\, A K^\top + \mathrm{agent\_bias})\, V, \qquad
        O = \mathrm{softmax}(\mathrm{scale}\, Q A^\top + \mathrm{query\_bias})\, V_A

    No mask: agent attention is bidirectional (as in the paper's vision models); a causal
    version would need per-position agents and is not provided.

    Args:
      q: queries ``[B, T, H, D]``.
      k: keys ``[B, S, K, D]``; ``K`` divides ``H`` (grouped-query attention).
      v: values ``[B, S, K, E]``.
      agents: agent tokens ``[B, N, H, D]``, e.g. :func:`pool_agents_1d` / :func:`pool_agents_2d`
        of ``q``.
      agent_bias: additive logits of the agent step, broadcastable to ``[B, H, N, S]``.
      query_bias: additive logits of the query step, broadcastable to ``[B, H, T, N]``.
      scale: logit scale of both steps; default ``1 / sqrt(D)``.
      implementation: ``"reference"`` (dense, explicit softmaxes; forms ``[N, S]`` and
        ``[T, N]``), ``"xla"`` (both steps through the blockwise :func:`attnjax.ops.attention`),
        ``"pallas"`` (both steps through the kernel), ``None`` or a sequence tried in order.

    Returns:
      ``[B, T, H, E]`` in ``q.dtype``.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (2, 64, 4, 8))
    >>> agents = ops.pool_agents_1d(q, 8)
    >>> out = ops.agent_attention(q, k, v, agents)
    >>> ref = ops.agent_attention(q, k, v, agents, implementation="reference")
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
    ((2, 64, 4, 8), True)
    """
    B, T, H, D = _checks.check_rank("q", q, ("batch", "q_len", "heads", "head_dim"))
    kshape = _checks.check_rank("k", k, ("batch", "kv_len", "kv_heads", "head_dim"))
    _checks.check_rank("v", v, ("batch", "kv_len", "kv_heads", "v_head_dim"))
    ashape = _checks.check_rank("agents", agents, ("batch", "num_agents", "heads", "head_dim"))
    _checks.check_float("agents", agents)
    if agents.dtype != q.dtype:
        raise TypeError(f"agents must have q's dtype {q.dtype}; got {agents.dtype}")
    _checks.check_dim("agents", ashape, 0, B, "batch, as in q")
    _checks.check_dim("agents", ashape, 2, H, "heads, as in q")
    _checks.check_dim("agents", ashape, 3, D, "head_dim, as in q")
    N, S = ashape[1], kshape[1]
    if N == 0:
        raise ValueError(f"agents must hold at least one agent; got shape {ashape}")
    if agent_bias is not None:
        _checks.broadcastable_to("agent_bias", agent_bias, (B, H, N, S), ("batch", "heads", "num_agents", "kv_len"))
    if query_bias is not None:
        _checks.broadcastable_to("query_bias", query_bias, (B, H, T, N), ("batch", "heads", "q_len", "num_agents"))
    scale = default_scale(D, scale)
    # q/k/v are checked by attention()'s own validator, here too so the reference path reports
    # the same errors as the composed ones.
    make_problem(q, k, v, None, None, None, "softmax", None, scale)

    def composed(impl):
        def run():
            v_agents = attention(agents, k, v, bias=agent_bias, scale=scale, implementation=impl)
            return attention(q, agents, v_agents, bias=query_bias, scale=scale, implementation=impl)
        return run

    def reference():
        return agent_attention_reference(q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias, scale=scale)

    impls = {"reference": reference, "xla": composed("xla"), "pallas": composed("pallas")}
    return dispatch.run("agent_attention", impls, implementation)


def agent_attention_reference(q, k, v, agents, *, agent_bias=None, query_bias=None, scale=None):
    """The paper's two equations with explicit ``jax.nn.softmax``, float32 (no validation)."""
    f32 = lambda x: x.astype(jnp.float32)
    H, K, D = q.shape[2], k.shape[2], q.shape[3]
    scale = default_scale(D, scale)
    hi = precision(jnp.float32)
    kr, vr = (jnp.repeat(f32(x), H // K, axis=2) for x in (k, v))  # reference: repeat K/V heads
    s_a = jnp.einsum("bnhd,bshd->bhns", f32(agents), kr, precision=hi) * scale
    if agent_bias is not None:
        s_a = s_a + f32(agent_bias)
    v_a = jnp.einsum("bhns,bshe->bnhe", jax.nn.softmax(s_a, axis=-1), vr, precision=hi)
    s_q = jnp.einsum("bthd,bnhd->bhtn", f32(q), f32(agents), precision=hi) * scale
    if query_bias is not None:
        s_q = s_q + f32(query_bias)
    out = jnp.einsum("bhtn,bnhe->bthe", jax.nn.softmax(s_q, axis=-1), v_a, precision=hi)
    return out.astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Making agents by pooling


def _pool_matrix(length: int, bins: int) -> np.ndarray:
    """``[bins, length]`` adaptive average pooling (PyTorch's ``AdaptiveAvgPool`` bins):
    bin ``i`` averages positions ``floor(i L / n) .. ceil((i + 1) L / n) - 1``."""
    m = np.zeros((bins, length), np.float32)
    for i in range(bins):
        lo, hi = (i * length) // bins, -(-((i + 1) * length) // bins)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def pool_agents_1d(x: Float[Array, "B T H D"], num_agents: int) -> Float[Array, "B N H D"]:
    """Agent tokens by adaptive average pooling of ``x`` over its sequence axis.

    ``x`` is ``[B, T, H, D]`` (usually the queries); returns ``[B, num_agents, H, D]`` where agent
    ``i`` averages positions ``floor(i T / N) .. ceil((i + 1) T / N) - 1`` (bins overlap by at
    most one position when ``N`` does not divide ``T``). ``num_agents <= T``.

    >>> import jax.numpy as jnp
    >>> pool_agents_1d(jnp.arange(6.0).reshape(1, 6, 1, 1), 3)[0, :, 0, 0]
    Array([0.5, 2.5, 4.5], dtype=float32)
    """
    B, T, H, D = _checks.check_rank("x", x, ("batch", "seq", "heads", "head_dim"))
    n = _checks.positive_int("num_agents", num_agents)
    if n > T:
        raise ValueError(f"num_agents={n} must be <= the sequence length T={T} of x (shape {x.shape})")
    p = jnp.asarray(_pool_matrix(T, n))
    out = jnp.einsum("nt,bthd->bnhd", p, x.astype(jnp.float32), precision=precision(jnp.float32))
    return out.astype(x.dtype)


def pool_agents_2d(
    x: Float[Array, "B T H D"], grid: tuple[int, int], agent_grid: tuple[int, int]
) -> Float[Array, "B N H D"]:
    """Agent tokens by adaptive average pooling over a 2-D grid (the paper's choice).

    ``x`` is ``[B, T, H, D]`` with ``T = height * width`` tokens in row-major order
    (``grid = (height, width)``); returns ``[B, n_h * n_w, H, D]`` for
    ``agent_grid = (n_h, n_w)``, agents also in row-major order. The paper uses 49 agents
    (``agent_grid = (7, 7)``).

    >>> import jax.numpy as jnp
    >>> x = jnp.arange(16.0).reshape(1, 16, 1, 1)  # a 4x4 image
    >>> pool_agents_2d(x, (4, 4), (2, 2))[0, :, 0, 0]
    Array([ 2.5,  4.5, 10.5, 12.5], dtype=float32)
    """
    B, T, H, D = _checks.check_rank("x", x, ("batch", "seq", "heads", "head_dim"))
    (gh, gw), (nh, nw) = _pair("grid", grid), _pair("agent_grid", agent_grid)
    if gh * gw != T:
        raise ValueError(f"grid={grid} has {gh * gw} positions but x has T={T} tokens (shape {x.shape})")
    if nh > gh or nw > gw:
        raise ValueError(f"agent_grid={agent_grid} must not exceed grid={grid} on either axis")
    ph, pw = jnp.asarray(_pool_matrix(gh, nh)), jnp.asarray(_pool_matrix(gw, nw))
    x2 = x.astype(jnp.float32).reshape(B, gh, gw, H, D)
    out = jnp.einsum("ay,cx,byxhd->bachd", ph, pw, x2, precision=precision(jnp.float32))
    return out.reshape(B, nh * nw, H, D).astype(x.dtype)


def _pair(name: str, value) -> tuple[int, int]:
    try:
        a, b = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of positive ints (height, width); got {value!r}") from None
    return _checks.positive_int(f"{name}[0]", a), _checks.positive_int(f"{name}[1]", b)
