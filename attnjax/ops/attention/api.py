"""The generic attention op: ``normalize(score_mod(scale * q k^T + bias), mask) v``."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from attnjax import _checks, masks
from attnjax.core import blocks, dispatch
from attnjax.core.blocks import BlockSizes
from attnjax.core.dispatch import Implementation
from attnjax.core.tiling import Dims, Problem, Shard
from attnjax.core.utils import default_scale
from attnjax.dropout import Dropout, check_rate
from attnjax.masks import KeyPrefix, Mask, QueryPrefix
from attnjax.normalizers import Normalizer, as_normalizer
from attnjax.ops.attention import cudnn, pallas, reference, xla
from attnjax.score_mods import ScoreMod, as_score_mod

JAX_NN_NAMES = ("query", "key", "value")
"""The names of q, k and v in errors of the ops that take them by jax.nn's names."""


def attention(
    query: Float[Array, "B T H D"],
    key: Float[Array, "B S K D"],
    value: Float[Array, "B S K E"],
    bias: Float[Array, "#B #H #T #S"] | None = None,
    mask: Mask | Bool[Array, "#B #H #T #S"] | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Int[Array, " B"] | None = None,
    key_value_seq_lengths: Int[Array, " B"] | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation = None,
    score_mod: ScoreMod | None = None,
    normalizer: str | Normalizer = "softmax",
    sigmoid_bias: float | None = None,
    return_lse: bool = False,
    dropout_rate: float = 0.0,
    dropout_key: PRNGKeyArray | None = None,
    block_sizes: BlockSizes | None = None,
    shard: Shard | None = None,
) -> Float[Array, "B T H E"] | tuple[Float[Array, "B T H E"], Float[Array, "B T H"]]:
    r"""Attention with a composable mask, score mod and normalizer; a drop-in for
    ``jax.nn.dot_product_attention``.

    .. math::

        O = N\big(\mathrm{mod}(\tfrac{1}{\sqrt{D}} Q K^\top + \mathrm{bias}),\ \mathrm{mask}\big)\, V

    where ``N`` is the normalizer (softmax over keys by default; sigmoid
    ``sigma(s - log S)`` as in "Theory, Analysis, and Best Practices for Sigmoid
    Self-Attention"; ``relu``; ``identity``) and masked entries get weight zero. A query with no
    allowed key gives a zero output (never NaN). Arithmetic is float32 whatever the input dtype.

    The first eleven arguments are those of ``jax.nn.dot_product_attention``, with its names,
    positions and meanings; each mask-like one becomes an :mod:`attnjax.masks` mask, and all of
    them are combined by ``&`` with ``mask``, so the blockwise paths skip the tiles they hide.
    Where attnjax differs from jax.nn:

    * ``is_causal`` and ``local_window_size`` are aligned top-left as in jax.nn (query ``i`` sits
      at position ``i``), but the library's own positional masks (``mask=masks.causal()``) align
      bottom-right (position ``i + S - T``, as when decoding with a cache); they agree when
      ``T == S``;
    * a query row with no allowed key gives zeros; jax.nn gives the mean of the values (except
      for rows past ``query_seq_lengths``, which it also zeroes);
    * jax.nn's ``return_residual`` is ``return_lse`` (float32, ``-inf`` for rows with no key);
    * ``mask`` may also be an :mod:`attnjax.masks` mask, ``bias`` must be floating point, and the
      sequence lengths may be any integer dtype.

    Args:
      query: queries ``[B, T, H, D]`` (or ``[T, H, D]``, as jax.nn; the output then has no batch axis).
      key: keys ``[B, S, K, D]``; ``K`` divides ``H`` (grouped-query attention: query head ``h``
        uses key head ``h // (H // K)``, as in jax.nn; K/V are never repeated in memory).
      value: values ``[B, S, K, E]``, or ``[B, S, K_v, E]`` with its own head count ``K_v``
        (dividing ``H``): query head ``h`` then uses value head ``h // (H // K_v)`` (DiffQKV; see
        :func:`split_head_counts`).
      bias: additive logits, broadcastable to ``[B, H, T, S]`` (rank 4, or lower: leading axes of
        size 1 are added, as jax.nn); it gets gradients.
      mask: an :mod:`attnjax.masks` mask (combine with ``&``, ``|``, ``~``; positional masks are
        aligned bottom-right), or a boolean array (``True`` = attend) broadcastable to
        ``[B, H, T, S]`` as in jax.nn (an ``O(T S)`` :func:`attnjax.masks.dense` mask: prefer the
        analytic masks and the arguments below, which cost nothing and let tiles be skipped).
      scale: logit scale; default ``1 / sqrt(D)``.
      is_causal: add ``masks.causal(align="top_left")`` (query ``i`` sees keys ``<= i``, as jax.nn).
      query_seq_lengths: ``[B]`` integers: queries at positions ``>= query_seq_lengths[b]`` are
        padding, see no key and give zeros (:func:`attnjax.masks.padding`).
      key_value_seq_lengths: ``[B]`` integers: keys at positions ``>= key_value_seq_lengths[b]``
        are padding (:func:`attnjax.masks.padding`).
      local_window_size: ``(left, right)``: query ``i`` sees keys ``i - left .. i + right``
        (``masks.sliding_window(left, right, align="top_left")``); an int ``w`` means ``(w, w)``,
        as in jax.nn.
      implementation: ``None`` (best for the platform: on a GPU cuDNN for what it serves, then
        Pallas, then xla), ``"reference"`` (dense), ``"xla"`` (blockwise, memory
        ``O(T * block)``, skips empty tiles), ``"pallas"`` (the flash kernels), ``"cudnn"``
        (``jax.nn.dot_product_attention``'s cuDNN path: softmax, causal or sliding window, bf16 or
        f16), or a sequence of them tried in order.
      score_mod: an :mod:`attnjax.score_mods` mod, a callable ``(score, b, h, q_idx, kv_idx)``,
        or a sequence of them (applied in order).
      normalizer: ``"softmax"``, ``"sigmoid"``, ``"relu"``, ``"identity"`` or a
        :class:`attnjax.normalizers.Normalizer`.
      sigmoid_bias: the sigmoid's bias ``b`` in ``sigma(s + b)``; default ``-log(S)``.
      return_lse: also return the float32 log-sum-exp of each row's logits, ``[B, T, H]``
        (``-inf`` for rows with no allowed key), to merge partial attentions. Softmax only.
      dropout_rate: drop each attention weight with this probability (kept weights scaled by
        ``1 / (1 - rate)``); for softmax, after normalizing. Which weights drop is a function of
        ``dropout_key`` and the weight's ``(b, h, q, kv)`` indices, so every implementation
        drops the same ones (see :mod:`attnjax.dropout`).
      dropout_key: a ``jax.random`` key, required when ``dropout_rate > 0``.
      block_sizes: tile sizes of the blockwise implementations (:class:`attnjax.ops.BlockSizes`;
        ``None`` and unset fields take the platform's defaults).
      shard: for sharded computations (:mod:`attnjax.parallel`): says that ``q``/``k``/``v`` are
        a piece of a larger problem, so masks, score mods, dropout and the sigmoid's ``-log S``
        use global sizes and positions (see :class:`attnjax.ops.Shard`).

    Returns:
      ``[B, T, H, E]`` in ``query.dtype``, and the log-sum-exp if ``return_lse``.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import masks, ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (2, 10, 4, 8))
    >>> out = ops.attention(q, k, v, mask=masks.causal())
    >>> ref = ops.attention(q, k, v, mask=masks.causal(), implementation="reference")
    >>> out.shape, bool(jnp.allclose(out, ref, atol=1e-5))
    ((2, 10, 4, 8), True)

    The same call as ``jax.nn.dot_product_attention``:

    >>> lengths = jnp.array([10, 7], jnp.int32)
    >>> ours = ops.attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)
    >>> theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)
    >>> bool(jnp.allclose(ours, theirs, atol=1e-5))
    True
    """
    q, k, v, unbatched = _batched(query, key, value)
    k, v = split_head_counts(q, k, v)
    B, T, S, H = _checks.check_qkv(q, k, v, names=JAX_NN_NAMES)[:4]
    if shard is not None and isinstance(shard, Shard):  # masks see global sizes
        B, H, T, S = shard.batch, shard.heads, shard.q_len, shard.kv_len
    mask = jax_nn_mask(
        mask,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        sizes=(B, H, T, S),
    )
    bias = _rank4("bias", bias)
    problem = make_problem(
        q, k, v, mask, score_mod, bias, normalizer, sigmoid_bias, scale, shard, JAX_NN_NAMES
    )
    if check_rate(dropout_rate) != 0.0 or dropout_key is not None:
        problem = dataclasses.replace(problem, dropout=Dropout.make(dropout_rate, dropout_key))
    if return_lse and not problem.normalizer.row_normalized:
        raise ValueError(
            f"return_lse needs a row-normalized normalizer (softmax); got {type(problem.normalizer).__name__}"
        )
    blocks.check(block_sizes)
    impls = {
        "reference": lambda: reference.attention(problem, q, k, v, bias),
        "xla": lambda: xla.attention(problem, q, k, v, bias, block_sizes),
        "pallas": lambda: pallas.attention(problem, q, k, v, bias, block_sizes),
        "cudnn": lambda: cudnn.attention(problem, q, k, v, bias, return_lse),
    }
    out, lse = dispatch.run("attention", impls, implementation)
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def sigmoid_attention(
    query: Float[Array, "B T H D"],
    key: Float[Array, "B S K D"],
    value: Float[Array, "B S K E"],
    bias: Float[Array, "#B #H #T #S"] | None = None,
    mask: Mask | Bool[Array, "#B #H #T #S"] | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Int[Array, " B"] | None = None,
    key_value_seq_lengths: Int[Array, " B"] | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation = None,
    sigmoid_bias: float | None = None,
    score_mod: ScoreMod | None = None,
    dropout_rate: float = 0.0,
    dropout_key: PRNGKeyArray | None = None,
    block_sizes: BlockSizes | None = None,
    shard: Shard | None = None,
) -> Float[Array, "B T H E"]:
    r"""Sigmoid attention ("Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
    Ramapuram et al., 2024): :math:`O = \sigma(\mathrm{scale}\, Q K^\top + b)\, V`, with
    ``b = -log(S)`` by default.

    No row max, no row sum: each weight depends on its own logit only. Arguments are those of
    :func:`attention` (masks, ``is_causal``, sequence lengths and windows alike).

    >>> import jax
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 6, 2, 4))
    >>> ops.sigmoid_attention(q, k, v, is_causal=True).shape
    (1, 6, 2, 4)
    """
    return attention(
        query,
        key,
        value,
        bias,
        mask,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        implementation=implementation,
        score_mod=score_mod,
        normalizer="sigmoid",
        sigmoid_bias=sigmoid_bias,
        dropout_rate=dropout_rate,
        dropout_key=dropout_key,
        block_sizes=block_sizes,
        shard=shard,
    )


def jax_nn_mask(
    mask=None,
    *,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    sizes: tuple[int, int, int, int],
) -> Mask | None:
    """The :mod:`attnjax.masks` mask of ``jax.nn.dot_product_attention``'s masking arguments
    (``mask`` an attnjax mask or a boolean array, ``is_causal``, the sequence lengths and
    ``local_window_size``), all combined by ``&``; None if none is given. ``sizes`` is
    ``(B, H, T, S)``. Raises errors naming the argument; ops with a causal form share it."""
    B = sizes[0]
    parts = []
    if mask is not None:
        parts.append(mask if isinstance(mask, Mask) else _dense_mask(mask, sizes))
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a Python bool; got {type(is_causal).__name__}")
    if is_causal:
        parts.append(masks.causal(align="top_left"))
    if local_window_size is not None:
        parts.append(masks.sliding_window(*_window(local_window_size), align="top_left"))
    if key_value_seq_lengths is not None:
        parts.append(KeyPrefix(_seq_lengths("key_value_seq_lengths", key_value_seq_lengths, B)))
    if query_seq_lengths is not None:
        parts.append(QueryPrefix(_seq_lengths("query_seq_lengths", query_seq_lengths, B)))
    out = None
    for m in parts:
        out = m if out is None else out & m
    return out


def _batched(query, key, value):
    """``(q, k, v, unbatched)``: jax.nn's unbatched ``[T, H, D]`` inputs get a batch axis of 1."""
    ranks = [getattr(x, "ndim", None) for x in (query, key, value)]
    if ranks == [3, 3, 3]:
        return query[None], key[None], value[None], True
    return query, key, value, False


def _rank4(name: str, x):
    """jax.nn's lower-rank ``bias``/``mask``: leading axes of size 1 added up to rank 4."""
    if x is None or getattr(x, "ndim", 4) >= 4:
        return x
    return jnp.reshape(x, (1,) * (4 - x.ndim) + tuple(x.shape))


def _dense_mask(mask, sizes) -> Mask:
    """A boolean array broadcastable to ``[B, H, T, S]`` (jax.nn's ``mask``) as a dense mask."""
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        raise TypeError(
            f"mask must be an attnjax.masks mask, a boolean array or None; got {type(mask).__name__}"
        )
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be boolean (True = attend); got dtype {mask.dtype} (an additive mask goes in bias)"
        )
    if mask.ndim > 4:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; expected rank <= 4, [batch, heads, q_len, kv_len]"
        )
    mask = _rank4("mask", jnp.asarray(mask))
    B, H, T, S = sizes
    _checks.broadcastable_to("mask", mask, (B, H, T, S), ("batch", "heads", "q_len", "kv_len"))
    # Dense masks index full positions: broadcast the query and key axes (O(T S) by nature).
    return masks.dense(jnp.broadcast_to(mask, (*mask.shape[:2], T, S)))


def _window(local_window_size) -> tuple[int, int]:
    w = local_window_size
    if isinstance(w, (tuple, list)):
        if len(w) != 2:
            raise ValueError(f"local_window_size must be an int or a (left, right) pair; got {w!r}")
        left, right = w
    else:
        left = right = w
    for side, x in (("left", left), ("right", right)):
        _checks.positive_int(f"local_window_size {side}", x, allow_zero=True)
    return int(left), int(right)


def _seq_lengths(name: str, x, batch: int):
    x = jnp.asarray(x)
    _checks.check_int_array(name, x)
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape [batch={batch}]; got shape {tuple(x.shape)}")
    return x


def make_problem(
    q, k, v, mask, score_mod, bias, normalizer, sigmoid_bias, scale, shard=None, names=("q", "k", "v")
) -> Problem:
    """Validates the arguments of the generic op (raising errors that name the argument) and
    bundles them into a :class:`attnjax.core.Problem`; ops built on attention reuse it."""
    B, T, S, H, K, D, E = _checks.check_qkv(q, k, v, names=names)
    dims = Dims(B, T, S, H, K, D, E)
    if shard is not None:
        _check_shard(shard, dims)
        B, H, T, S = shard.batch, shard.heads, shard.q_len, shard.kv_len  # masks see global sizes
    if mask is not None:
        if not isinstance(mask, Mask):
            raise TypeError(f"mask must be an attnjax.masks mask or None; got {type(mask).__name__}")
        mask.check(B, H, T, S)
    score_mod = as_score_mod(score_mod)
    if score_mod is not None:
        score_mod.check(H)
        _check_score_mod_output(score_mod, dims.batch, dims.heads, T, S)
    if bias is not None:
        d = dims
        _checks.broadcastable_to(
            "bias", bias, (d.batch, d.heads, d.q_len, d.kv_len), ("batch", "heads", "q_len", "kv_len")
        )
        _checks.check_float("bias", bias)
    return Problem(
        dims, default_scale(D, scale), mask, score_mod, as_normalizer(normalizer, sigmoid_bias), shard=shard
    )


def _check_score_mod_output(score_mod: ScoreMod, batch: int, heads: int, q_len: int, kv_len: int) -> None:
    """A score mod must return float scores of the shape it was given (traced abstractly, once):
    a wrong one would otherwise fail deep inside an einsum or broadcast silently."""
    t, s = min(2, q_len), min(3, kv_len)
    shape = (batch, heads, t, s)
    ar = lambda n: jnp.arange(n, dtype=jnp.int32)
    idx = (
        ar(batch)[:, None, None, None],
        ar(heads)[None, :, None, None],
        ar(t)[None, None, :, None],
        ar(s)[None, None, None, :],
    )
    out = jax.eval_shape(
        lambda x: score_mod(q_len, kv_len, x, *idx), jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    got = getattr(out, "shape", None)
    if got != shape or not jnp.issubdtype(out.dtype, jnp.floating):
        what = f"{getattr(out, 'dtype', type(out).__name__)}{list(got) if got is not None else ''}"
        raise ValueError(
            f"score_mod must return float scores of the shape it is given; given float32{list(shape)} "
            f"[batch, heads, q tile, kv tile], it returned {what}"
        )


def _check_shard(shard, dims: Dims) -> None:
    if not isinstance(shard, Shard):
        raise TypeError(f"shard must be an attnjax.ops.Shard or None; got {type(shard).__name__}")
    for name, local, total in (
        ("batch", dims.batch, shard.batch),
        ("heads", dims.heads, shard.heads),
        ("q_len", dims.q_len, shard.q_len),
        ("kv_len", dims.kv_len, shard.kv_len),
    ):
        if total < local:
            raise ValueError(
                f"shard.{name}={total} is the global size; it cannot be smaller than the "
                f"local {name}={local} of q/k/v"
            )
    if shard.head_ids is not None and tuple(shard.head_ids.shape) != (dims.heads,):
        raise ValueError(
            f"shard.head_ids has shape {tuple(shard.head_ids.shape)}; expected one global head "
            f"index per local head, [heads={dims.heads}]"
        )


# -- separate key-head and value-head counts (C8) --------------------------------------------------


def split_head_counts(q, k, v):
    """``(k, v)`` with one head count, for keys and values that have their own (``K_k != K_v``,
    both dividing ``H``; DiffQKV, "Sigma", Lin et al., 2025).

    Query head ``h`` uses key head ``h // (H // K_k)`` and value head ``h // (H // K_v)``. With
    ``L = lcm(K_k, K_v)`` (which divides ``H``), repeating each key head ``L / K_k`` times and each
    value head ``L / K_v`` times gives ordinary grouped-query attention with ``L`` heads that is
    exactly that map, so every implementation (reference, blockwise, kernels) serves it. The
    declared cost: the tensor with fewer heads is repeated up to ``L`` heads in memory (the cache
    stays compressed; only the op's operand grows). Equal counts return ``k, v`` untouched.
    """
    if getattr(k, "ndim", 0) != 4 or getattr(v, "ndim", 0) != 4 or getattr(q, "ndim", 0) != 4:
        return k, v  # check_qkv names what is wrong
    kk, kv = k.shape[2], v.shape[2]
    if kk == kv:
        return k, v
    H = q.shape[2]
    for name, n, x in (("key", kk, k), ("value", kv, v)):
        if n == 0 or H % n:
            raise ValueError(f"{name} has {n} heads (shape {tuple(x.shape)}), which must divide the {H} query "
                             f"heads (keys and values may have different head counts, each dividing H)")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"key {tuple(k.shape)} and value {tuple(v.shape)} must agree in [batch, kv_len]")
    L = math.lcm(kk, kv)
    rep = lambda x, r: x if r == 1 else jnp.repeat(x, r, axis=2)
    return rep(k, L // kk), rep(v, L // kv)
