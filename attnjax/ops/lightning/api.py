r"""Lightning attention: causal linear attention with a per-head exponential decay.

.. math::

    o_t = \mathrm{scale} \sum_{s \le t} \lambda_h^{\,t-s}\, (q_t \cdot k_s)\, v_s
    \quad\Longleftrightarrow\quad
    S_t = \lambda_h S_{t-1} + k_t^\top v_t,\qquad o_t = \mathrm{scale}\; q_t S_t,

with ``\lambda_h = exp(log_decay[h])`` and state ``S_t`` of shape ``[D, E]`` per head, kept in
float32. Papers: "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in
Large Language Models" (Qin et al., 2024); "Various Lengths, Constant Speed: Efficient Language
Modeling with Lightning Attention" (Qin et al., 2024); decays from TransNormerLLM (Qin et al., 2023).

Letter legend: B batch, T length, H query heads, K key/value heads (K divides H), D query/key
head dim, E value head dim (may differ from D).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from attnjax import _checks
from attnjax.core import dispatch
from attnjax.ops.lightning import common, pallas, reference, xla
from attnjax.score_mods import alibi_slopes
from attnjax.core.blocks import BlockSizes
from attnjax.core.utils import default_scale, precision
from attnjax.core.dispatch import Implementation


def lightning_slopes(num_heads: int) -> Float[Array, "H"]:
    """ALiBi-style decay rates ``2^(-8 (i + 1) / H)`` of TransNormerLLM / Lightning Attention.

    For ``H`` not a power of two the slopes of the ALiBi paper's extension are used (those of
    the nearest lower power of two, interleaved with odd ones of the next), as the reference
    implementations do. Decays are ``lambda_h = exp(-slope_h)``: pass ``log_decay=-slopes``.

    >>> from attnjax import ops
    >>> ops.lightning_slopes(4).tolist()
    [0.25, 0.0625, 0.015625, 0.00390625]
    """
    return alibi_slopes(num_heads)


def lightning_layer_slopes(num_heads: int, layer_idx: int, num_layers: int) -> Float[Array, "H"]:
    """TransNormerLLM's per-layer slopes: ``slopes * (1 - layer_idx / (num_layers - 1) + 1e-5)``.

    Lower layers decay fast (local), the top layer almost not at all (global). ``layer_idx``
    counts from 0. Pass ``log_decay=-lightning_layer_slopes(...)``.

    >>> from attnjax import ops
    >>> tuple(round(float(x), 6) for x in ops.lightning_layer_slopes(2, 1, 3))
    (0.031251, 0.001953)
    """
    num_layers = _checks.positive_int("num_layers", num_layers)
    layer_idx = _checks.positive_int("layer_idx", layer_idx, allow_zero=True)
    if layer_idx >= num_layers:
        raise ValueError(f"layer_idx must be < num_layers={num_layers}; got {layer_idx}")
    ratio = 1.0 - layer_idx / (num_layers - 1) + 1e-5 if num_layers > 1 else 1.0 + 1e-5
    return lightning_slopes(num_heads) * ratio


def lightning_attention(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B T K D"],
    v: Float[Array, "B T K E"],
    *,
    log_decay: Float[Array, "H"] | float | None = None,
    scale: float | None = None,
    initial_state: Float[Array, "B H D E"] | None = None,
    return_final_state: bool = False,
    segment_ids: Int[Array, "B T"] | None = None,
    block_size: int | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B T H E"] | tuple[Float[Array, "B T H E"], Float[Array, "B H D E"]]:
    r"""Lightning attention (causal linear attention with per-head decay), ``O(T)`` time and memory.

    .. math::

        o_t = \mathrm{scale}\, q_t \Big(\lambda_h^{t+1} S_{-1}
              + \sum_{s \le t} \lambda_h^{t-s}\, k_s^\top v_s\Big),\qquad
        \lambda_h = e^{\mathrm{log\_decay}_h},

    where ``S_{-1}`` is ``initial_state``. Causal only (query ``t`` sees keys ``s <= t``);
    queries and keys have the same length. Arithmetic and the state are float32.

    Args:
      q: queries ``[B, T, H, D]``. No feature map is applied (compose one from
        :mod:`attnjax.features` first if wanted).
      k: keys ``[B, T, K, D]``; ``K`` divides ``H`` (grouped-query: query head ``h`` reads key
        head ``h // (H // K)``).
      v: values ``[B, T, K, E]``.
      log_decay: ``log lambda`` per query head, shape ``[H]`` (or a scalar), each ``<= 0``;
        ``None`` means no decay (plain causal linear attention). May be traced (``jit``, learned);
        gradients flow to it. See :func:`lightning_slopes` (use ``-lightning_slopes(H)``).
      scale: multiplies ``q``; default ``1 / sqrt(D)``.
      initial_state: float ``[B, H, D, E]``, the state before token 0 (default zeros).
      return_final_state: also return the float32 state after the last token, ``[B, H, D, E]``
        (feed it to the next call or to :func:`lightning_decode_step`).
      segment_ids: integers ``[B, T]`` for packed sequences: the state resets to zero wherever
        the id changes, so no information crosses documents. ``initial_state`` feeds the
        first document of each row; the final state is that of the last document.
      block_size: chunk length of the ``xla`` and ``pallas`` paths (default 64).
      implementation: ``None`` (best for the platform), ``"reference"`` (the float32 token
        recurrence, ``lax.scan``), ``"xla"`` (chunked, parallel over chunks), ``"pallas"``
        (kernels; interpret mode on CPU), or a sequence of them tried in order.

    Returns:
      ``out`` ``[B, T, H, E]`` in ``q.dtype``, and the final state if ``return_final_state``.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 50, 4, 8))
    >>> a = -ops.lightning_slopes(4)
    >>> out, state = ops.lightning_attention(q, k, v, log_decay=a, return_final_state=True)
    >>> ref = ops.lightning_attention(q, k, v, log_decay=a, implementation="reference")
    >>> out.shape, state.shape, bool(jnp.allclose(out, ref, atol=1e-4))
    ((2, 50, 4, 8), (2, 4, 8, 8), True)
    """
    B, T, H, D, E = check_qkv(q, k, v)
    a = check_log_decay(log_decay, H)
    scale = default_scale(D, scale)
    s0 = check_initial_state(initial_state, (B, H, D, E))
    if segment_ids is not None:
        _checks.check_rank("segment_ids", segment_ids, ("batch", "length"))
        _checks.check_int_array("segment_ids", segment_ids)
        if tuple(segment_ids.shape) != (B, T):
            raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}; expected [batch={B}, length={T}]")
    if block_size is not None:
        block_size = _checks.positive_int("block_size", block_size)
    if not isinstance(return_final_state, bool):
        raise TypeError(f"return_final_state must be a bool; got {return_final_state!r}")

    G = H // k.shape[2]
    # Repeat key/value heads for grouped-query attention: each query head has its own decay and
    # hence its own state, so the K/V of a group are read H/K times either way.
    k_h, v_h = (jnp.repeat(x, G, axis=2) if G > 1 else x for x in (k, v))
    docs = common.doc_ids(segment_ids, B, T)
    args = (q, k_h, v_h, a, docs, s0, scale)

    block_size = block_size or BlockSizes().resolve("lightning").block_q
    impls = {
        "reference": lambda: reference.recurrence(*args),
        "xla": lambda: xla.forward(*args, block_size=block_size),
        "pallas": lambda: pallas.forward(*args, block_size=block_size),
    }
    out, final = dispatch.run("lightning_attention", impls, implementation)
    out = out.astype(q.dtype)
    return (out, final) if return_final_state else out


def lightning_decode_step(
    q: Float[Array, "B 1 H D"],
    k: Float[Array, "B 1 K D"],
    v: Float[Array, "B 1 K E"],
    state: Float[Array, "B H D E"],
    *,
    log_decay: Float[Array, "H"] | float | None = None,
    scale: float | None = None,
    reset: Bool[Array, "B"] | None = None,
) -> tuple[Float[Array, "B 1 H E"], Float[Array, "B H D E"]]:
    r"""One decoding step of :func:`lightning_attention`: ``S <- lambda S + k^T v``, ``o = scale q S``.

    ``reset`` (bool ``[B]``) starts a new document in that row (the old state is dropped).
    Feeding tokens one at a time from a prefill's final state reproduces the full computation.

    Returns ``(out [B, 1, H, E] in q.dtype, new_state [B, H, D, E] float32)``.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 5, 2, 4))
    >>> full = ops.lightning_attention(q, k, v, log_decay=-0.1)
    >>> _, s = ops.lightning_attention(q[:, :4], k[:, :4], v[:, :4], log_decay=-0.1, return_final_state=True)
    >>> o, s = ops.lightning_decode_step(q[:, 4:], k[:, 4:], v[:, 4:], s, log_decay=-0.1)
    >>> bool(jnp.allclose(o, full[:, 4:], atol=1e-5))
    True
    """
    B, T, H, D, E = check_qkv(q, k, v)
    if T != 1:
        raise ValueError(f"lightning_decode_step takes one token: q has shape {tuple(q.shape)}, expected [B, 1, H, D]")
    a = check_log_decay(log_decay, H)
    scale = default_scale(D, scale)
    _checks.check_rank("state", state, ("batch", "heads", "head_dim", "v_head_dim"))
    _checks.check_float("state", state)
    if tuple(state.shape) != (B, H, D, E):
        raise ValueError(f"state has shape {tuple(state.shape)}; expected [B={B}, H={H}, D={D}, E={E}]")
    G = H // k.shape[2]
    f32 = lambda x: x[:, 0].astype(jnp.float32)
    k1, v1 = jnp.repeat(f32(k), G, axis=1), jnp.repeat(f32(v), G, axis=1)  # [B, H, D], [B, H, E]
    decayed = jnp.exp(a)[None, :, None, None] * state.astype(jnp.float32)
    if reset is not None:
        _checks.check_rank("reset", reset, ("batch",))
        if tuple(reset.shape) != (B,):
            raise ValueError(f"reset has shape {tuple(reset.shape)}; expected [batch={B}]")
        decayed = jnp.where(jnp.asarray(reset, bool)[:, None, None, None], 0.0, decayed)
    new = decayed + k1[..., :, None] * v1[..., None, :]
    out = jnp.einsum("bhd,bhde->bhe", scale * f32(q), new, precision=precision(jnp.float32))
    return out[:, None].astype(q.dtype), new


# -- validation --------------------------------------------------------------------------------


def check_qkv(q, k, v):
    B, T, _, H, _, D, E = _checks.check_qkv(q, k, v, same_length=True)
    return B, T, H, D, E


def check_log_decay(log_decay, heads: int):
    if log_decay is None:
        return jnp.zeros((heads,), jnp.float32)
    if isinstance(log_decay, (int, float)):
        log_decay = np.float32(log_decay)
    _checks.per_head("log_decay", log_decay, heads)
    if not jnp.issubdtype(jnp.result_type(log_decay), jnp.floating):
        raise TypeError(f"log_decay must be floating point; got dtype {jnp.result_type(log_decay)}")
    if not isinstance(log_decay, jax.core.Tracer) and not np.all(np.asarray(log_decay) <= 0):  # NaN too
        raise ValueError(f"log_decay must be <= 0 (a decay lambda = exp(log_decay) <= 1; -inf for none); "
                         f"got {np.asarray(log_decay)}")
    return jnp.broadcast_to(jnp.asarray(log_decay, jnp.float32), (heads,))


def check_initial_state(s0, shape):
    if s0 is None:
        return jnp.zeros(shape, jnp.float32)
    _checks.check_rank("initial_state", s0, ("batch", "heads", "head_dim", "v_head_dim"))
    _checks.check_float("initial_state", s0)
    if tuple(s0.shape) != shape:
        B, H, D, E = shape
        raise ValueError(f"initial_state has shape {tuple(s0.shape)}; expected [B={B}, H={H}, D={D}, E={E}]")
    return s0.astype(jnp.float32)
