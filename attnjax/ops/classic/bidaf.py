r"""BiDAF attention flow ("Bidirectional Attention Flow for Machine Comprehension", Seo et al.,
ICLR 2017; allenai/bi-att-flow).

Context ``h_t`` (``T``), query ``u_j`` (``J``), trilinear similarity

.. math::

    S_{tj} = w^\top [h_t; u_j; h_t \circ u_j] = w_1 \cdot h_t + w_2 \cdot u_j + (w_3 \circ h_t) \cdot u_j.

Context-to-query: ``a_t = softmax_j S_t:``, ``u~_t = sum_j a_tj u_j``; ``w_1 . h_t`` is constant
over ``j`` and cancels, so this is ``ops.attention(q = w_3 * h, k = u, v = u, scale = 1)`` plus the
key-only bias ``w_2 . u_j``. Query-to-context: ``b = softmax_t(max_j S_tj)``, ``h~ = sum_t b_t
h_t`` tiled over ``T``; the row maxima are taken over key chunks (``O(T chunk)`` memory). Output
``G_t = [h_t; u~_t; h_t * u~_t; h_t * h~]`` ``[B, T, 4C]``.

Letter legend: B batch, T context words, J query words, C features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attnjax import _checks, masks
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention

NEG = -1e30  # a large finite negative, not -inf, so padded rows stay finite


def _check(h, u, w):
    B, T, C = _checks.check_rank("h", h, ("batch", "context_len", "features"))
    ushape = _checks.check_rank("u", u, ("batch", "query_len", "features"))
    if ushape[0] != B or ushape[2] != C:
        raise ValueError(f"u must be [batch={B}, query_len, features={C}]; got {ushape}")
    if jnp.shape(w) != (3 * C,):
        raise ValueError(f"w must have shape [3 * features = {3 * C}]; got {jnp.shape(w)}")
    return B, T, ushape[1], C


def _lengths(lengths, n):
    return None if lengths is None else jnp.arange(n)[None] < jnp.asarray(lengths)[:, None]


def bidaf_similarity(h, u, w) -> Float[Array, "B T J"]:
    """The dense trilinear similarity ``S [B, T, J]``, step by step (``[h; u; h * u]`` per pair)."""
    C = h.shape[-1]
    hf, uf, wf = h.astype(jnp.float32), u.astype(jnp.float32), w.astype(jnp.float32)
    T, J = hf.shape[1], uf.shape[1]
    hh = jnp.broadcast_to(hf[:, :, None], (*hf.shape[:2], J, C))
    uu = jnp.broadcast_to(uf[:, None], (hf.shape[0], T, J, C))
    return jnp.einsum("btjc,c->btj", jnp.concatenate([hh, uu, hh * uu], -1), wf, precision="highest")


def _assemble(h, c2q, h_tilde):
    hf = h.astype(jnp.float32)
    return jnp.concatenate([hf, c2q, hf * c2q, hf * h_tilde[:, None]], -1).astype(h.dtype)


def bidaf_attention(
    h: Float[Array, "B T C"],
    u: Float[Array, "B J C"],
    w: Float[Array, " C3"],
    *,
    context_lengths: Int[Array, " B"] | None = None,
    query_lengths: Int[Array, " B"] | None = None,
    chunk: int = 128,
    implementation: Implementation = None,
) -> Float[Array, "B T 4C"]:
    r"""BiDAF's attention flow layer ``G [B, T, 4C]`` (module docstring).

    Padded query words (``>= query_lengths[b]``) get no attention; padded context words take no
    part in the query-to-context softmax (their own rows of ``G`` are computed but meaningless).
    ``implementation``: ``"reference"`` (the dense ``S`` step by step) or ``"xla"``
    (``ops.attention`` for C2Q, chunked row maxima for Q2C; ``chunk`` query words at a time).

    >>> import jax.numpy as jnp
    >>> h = jnp.ones((1, 2, 3)); u = jnp.arange(3.0).reshape(1, 1, 3)    # one query word
    >>> g = bidaf_attention(h, u, jnp.zeros(9))
    >>> g.shape, g[0, 0, 3:6].tolist()                                    # u~_t = u_1
    ((1, 2, 12), [0.0, 1.0, 2.0])
    """
    B, T, J, C = _check(h, u, w)
    chunk = _checks.positive_int("chunk", chunk)
    qvalid, tvalid = _lengths(query_lengths, J), _lengths(context_lengths, T)
    w1, w2, w3 = (w[i * C : (i + 1) * C].astype(jnp.float32) for i in range(3))

    def q2c(row_max):
        logits = jnp.where(tvalid, row_max, NEG) if tvalid is not None else row_max
        b = jax.nn.softmax(logits, -1)
        return jnp.einsum("bt,btc->bc", b, h.astype(jnp.float32), precision="highest")

    def reference():
        S = bidaf_similarity(h, u, w)
        if qvalid is not None:
            S = jnp.where(qvalid[:, None], S, NEG)
        a = jax.nn.softmax(S, -1)
        if qvalid is not None:  # a context word with no valid query word reads nothing
            a = jnp.where(qvalid[:, None].any(-1, keepdims=True), a, 0.0)
        c2q = jnp.einsum("btj,bjc->btc", a, u.astype(jnp.float32), precision="highest")
        return _assemble(h, c2q, q2c(S.max(-1)))

    def xla():
        hf, uf = h.astype(jnp.float32), u.astype(jnp.float32)
        key_bias = (uf @ w2)[:, None, None, :]  # [B, 1, 1, J]
        mask = None if query_lengths is None else masks.padding(jnp.asarray(query_lengths))
        c2q = attention(
            (hf * w3)[:, :, None],
            uf[:, :, None],
            uf[:, :, None],
            key_bias,
            mask,
            scale=1.0,
            implementation="xla",
        )[:, :, 0]
        # Q2C: max_j S_tj = w1 . h_t + max_j (w2 . u_j + (w3 h_t) . u_j), over chunks of j
        n = -(-J // chunk)
        pad = n * chunk - J
        valid = jnp.ones((B, J), bool) if qvalid is None else qvalid
        up = jnp.pad(uf, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, C).swapaxes(0, 1)
        vp = jnp.pad(valid, ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)

        def step(best, xs):
            uc, vc = xs  # [B, chunk, C], [B, chunk]
            s = jnp.einsum("btc,bjc->btj", hf * w3, uc, precision="highest") + (uc @ w2)[:, None]
            return jnp.maximum(best, jnp.where(vc[:, None], s, NEG).max(-1)), None

        best, _ = jax.lax.scan(step, jnp.full((B, T), NEG, jnp.float32), (up, vp))
        return _assemble(h, c2q.astype(jnp.float32), q2c(hf @ w1 + best))

    return dispatch.run("bidaf_attention", {"reference": reference, "xla": xla}, implementation)
