"""The agent attention module of "Agent Attention: On the Integration of Softmax and Linear
Attention" (Han et al., ECCV 2024), for 1-D sequences and 2-D grids.

Letter legend: B batch, T tokens (``h * w`` on a grid), H heads, D head dim, C features,
N agents.
"""

from __future__ import annotations

import jax
from flax import nnx
from jaxtyping import Array, Float

from attnjax import _checks, ops
from attnjax.nn.layers import head_projections
from attnjax.nn.sharding import depthwise_conv, param


def resize_bias(table: Array, size: tuple[int, ...]) -> Array:
    """Resizes the trailing axes of ``table`` to ``size`` by (bi)linear interpolation as the
    official code does (``torch.nn.functional.interpolate(mode="bilinear")``, i.e. half-pixel
    centres, ``align_corners=False``, no antialiasing), also when ``size`` is smaller than the
    table. (``jax.image.resize`` antialiases when downsampling unless told not to, which would
    average a 7x7 table differently from the official model on small grids.)

    >>> import jax.numpy as jnp
    >>> resize_bias(jnp.arange(4.0)[None], (2,))  # no antialiasing: samples at 0.5 and 2.5
    Array([[0.5, 2.5]], dtype=float32)
    """
    shape = (*table.shape[: table.ndim - len(size)], *size)
    return jax.image.resize(table, shape, method="linear", antialias=False)


class AgentAttention(nnx.Module):
    r"""Agent attention with the paper's agent biases and depthwise convolution on V.

    .. math::

        A = \mathrm{pool}(Q), \quad
        O = \mathrm{agent\_attention}(Q, K, V, A; B_A, B_Q) + \mathrm{DWC}(V), \quad
        y = O W_O

    * agents ``A`` are ``num_agents`` adaptive average pools of the queries, over the sequence
      (1-D input ``[B, T, C]``, ``agents=int``) or over the grid (2-D input ``[B, h, w, C]``,
      ``agents=(n_h, n_w)``; the paper uses 7x7 = 49);
    * agent biases: learned tables ``[H, N, p]`` (1-D) or ``[H, N, p, p]`` (2-D), ``p =
      bias_size``, resized bilinearly (as the official code: :func:`resize_bias`, no
      antialiasing) to the input's length or grid: ``B_A[h, n, s]`` for the
      agent step and ``B_Q[h, t, n]`` for the query step (the paper's interpolated agent biases;
      its extra per-row/column terms for one fixed resolution are left out so any input size
      works);
    * ``DWC``: a depthwise convolution of kernel ``dwc_kernel`` over V laid out on the input's
      sequence or grid, added to the output to restore feature diversity (the paper's fix for
      the low rank of linear-like attention).

    The attention itself is :func:`attnjax.ops.agent_attention` (linear in ``T``: it never forms
    ``[T, T]``).

    >>> import jax
    >>> from flax import nnx
    >>> from attnjax import nn
    >>> m = nn.AgentAttention(2, 16, agents=(2, 2), rngs=nnx.Rngs(0))
    >>> m(jax.random.normal(jax.random.key(0), (1, 6, 6, 16))).shape
    (1, 6, 6, 16)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        agents: int | tuple[int, int] = (7, 7),
        qkv_features: int | None = None,
        bias_size: int = 7,
        agent_bias: bool = True,
        dwc_kernel: int = 3,
        use_bias: bool = True,
        implementation=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        H, C, qkv = _checks.head_features(num_heads, in_features, qkv_features)
        if isinstance(agents, int):
            self.agent_grid = (_checks.positive_int("agents", agents),)
        else:
            if len(agents) != 2:
                raise ValueError(f"agents must be an int (1-D) or a pair (n_h, n_w) (2-D); got {agents!r}")
            self.agent_grid = tuple(_checks.positive_int("agents", a) for a in agents)
        self.spatial = len(self.agent_grid)
        self.num_heads, self.head_dim, self.in_features = H, qkv // H, C
        self.implementation = implementation
        N = 1
        for a in self.agent_grid:
            N *= a
        self.num_agents = N
        self.query, self.key, self.value, self.out = head_projections(
            C, H, qkv // H, use_bias=use_bias, dtype=dtype, rngs=rngs)
        kernel = (_checks.positive_int("dwc_kernel", dwc_kernel),) * self.spatial
        # the qkv = H * D channels are heads-major, so "heads" splits them by heads
        self.dwc = depthwise_conv(qkv, kernel, "heads", dtype=dtype, rngs=rngs)
        if agent_bias:
            p = (_checks.positive_int("bias_size", bias_size),) * self.spatial
            init = nnx.initializers.truncated_normal(0.02)
            names = ("heads", None, *(None,) * self.spatial)
            self.agent_bias_table = param(init(rngs.params(), (H, N, *p)), *names)
            self.query_bias_table = param(init(rngs.params(), (H, N, *p)), *names)
        else:
            self.agent_bias_table = nnx.data(None)
            self.query_bias_table = nnx.data(None)

    def biases(self, grid: tuple[int, ...]):
        """``(agent_bias [1, H, N, T], query_bias [1, H, T, N])`` for an input of this grid."""
        if self.agent_bias_table is None:
            return None, None
        H, N = self.num_heads, self.num_agents
        resize = lambda t: resize_bias(t[...], grid).reshape(H, N, -1)
        agent_bias = resize(self.agent_bias_table)[None]
        query_bias = resize(self.query_bias_table).transpose(0, 2, 1)[None]
        return agent_bias, query_bias

    def project(self, x: Array):
        """``(q, k, v)`` as ``[B, T, H, D]``, and the input's grid."""
        if x.ndim != self.spatial + 2 or x.shape[-1] != self.in_features:
            want = "[batch, seq, C]" if self.spatial == 1 else "[batch, height, width, C]"
            raise ValueError(
                f"AgentAttention with agents={self.agent_grid} takes x of shape {want} with "
                f"C={self.in_features}; got {x.shape}"
            )
        grid = x.shape[1:-1]
        if any(g < a for g, a in zip(grid, self.agent_grid)):
            raise ValueError(f"input grid {grid} is smaller than the agent grid {self.agent_grid}")
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.query(flat), self.key(flat), self.value(flat), grid

    def make_agents(self, q: Array, grid: tuple[int, ...]) -> Array:
        if self.spatial == 1:
            return ops.pool_agents_1d(q, self.agent_grid[0])
        return ops.pool_agents_2d(q, grid, self.agent_grid)

    def depthwise(self, v: Array, grid: tuple[int, ...]) -> Array:
        """``DWC(V)`` as ``[B, T, H, D]``."""
        B, T, H, D = v.shape
        y = self.dwc(v.reshape(B, *grid, H * D))
        return y.reshape(B, T, H, D)

    def __call__(self, x: Float[Array, "B *grid C"]) -> Float[Array, "B *grid C"]:
        q, k, v, grid = self.project(x)
        agents = self.make_agents(q, grid)
        agent_bias, query_bias = self.biases(grid)
        if agent_bias is not None:
            agent_bias, query_bias = agent_bias.astype(q.dtype), query_bias.astype(q.dtype)
        o = ops.agent_attention(
            q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias, implementation=self.implementation
        )
        o = o + self.depthwise(v, grid)
        return self.out(o).reshape(x.shape[:-1] + (self.in_features,))
