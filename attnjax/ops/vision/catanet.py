r"""Content-aware token aggregation attention ("CATANet: Efficient Content-Aware Token Aggregation
for Lightweight Image Super-Resolution", CVPR 2025, arXiv 2503.06896): IASA + IRCA.

Tokens are assigned to ``M`` token centres (``a_i = argmax_m cos(x_i, mu_m)``, no gradient) and
stably sorted by their centre, ``pi``. **IASA**: in sorted order, the tokens are cut into groups of
``g``; group ``t``'s queries attend to the keys of groups ``t`` and ``t + 1``. **IRCA**: every query
also attends, in a separate softmax, to ``M`` keys and values made from the centres. The two are
summed (not LSE-merged, as in the code) and un-permuted:

.. math::

    O_{\pi(i)} = \mathrm{softmax}_{j:\ \lfloor j/g \rfloor - \lfloor i/g \rfloor \in \{0, 1\}}
        (\mathrm{scale}\; q_{\pi(i)} \cdot k_{\pi(j)})\, V_\pi
      + \mathrm{softmax}_m(\mathrm{scale}\; q_{\pi(i)} \cdot k^c_m)\, V^c

The efficient path gathers the sorted tokens, unfolds each group's ``2 g`` keys and batches the
groups into :func:`attnjax.ops.attention` (``O(N g D)``); the reference is
:func:`attnjax.ops.attention` over the whole sorted sequence with the group mask
(``O(N^2 D)``). (The official code pads the sorted sequence's tail with a flipped copy of its last
tokens, which then count twice among the last group's keys; here the padding is masked, so every
key counts once.)

Letter legend: B batch, N tokens, H heads, K key/value heads, D head dim, E value dim, M centres.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attnjax import _checks, masks
from attnjax.core import dispatch
from attnjax.core.dispatch import Implementation
from attnjax.ops.attention.api import attention


def cosine_assign(x: Float[Array, "B N C"], centers: Float[Array, "M C"]) -> Int[Array, "B N"]:
    """``argmax_m cos(x_i, mu_m)`` (under ``stop_gradient``): each token's centre."""
    x, c = jax.lax.stop_gradient(x).astype(jnp.float32), jax.lax.stop_gradient(centers).astype(jnp.float32)
    unit = lambda t: t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-6)
    return jnp.argmax(jnp.einsum("bnc,mc->bnm", unit(x), unit(c)), -1).astype(jnp.int32)


def token_aggregation_attention(
    q: Float[Array, "B N H D"],
    k: Float[Array, "B N K D"],
    v: Float[Array, "B N K E"],
    assignment: Int[Array, "B N"],
    *,
    group: int,
    center_k: Float[Array, "B M K D"] | None = None,
    center_v: Float[Array, "B M K E"] | None = None,
    scale: float | None = None,
    implementation: Implementation = None,
) -> Float[Array, "B N H E"]:
    r"""CATANet's IASA (+ IRCA with ``center_k``/``center_v``); the module docstring has the
    equation.

    Args:
      q, k, v: ``[B, N, H|K, D|E]`` tokens.
      assignment: each token's centre ``[B, N]`` (integers; only the order matters:
        :func:`cosine_assign`). Tokens are stably sorted by it.
      group: ``g``, the group size in sorted order.
      center_k, center_v: the IRCA keys and values ``[B or 1, M, K, D|E]`` (both or neither).
      implementation: ``"xla"`` / ``"pallas"`` (groups as a batch), ``"reference"`` (dense with
        the group mask), ``None``.

    >>> import jax, jax.numpy as jnp
    >>> from attnjax import ops
    >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 20, 2, 4))
    >>> a = jax.random.randint(jax.random.key(1), (1, 20), 0, 3)
    >>> out = ops.token_aggregation_attention(q, k, v, a, group=6)
    >>> ref = ops.token_aggregation_attention(q, k, v, a, group=6, implementation="reference")
    >>> bool(jnp.allclose(out, ref, atol=1e-5))
    True
    """
    B, N, _, H, K, D, E = _checks.check_qkv(q, k, v, same_length=True)
    if _checks.check_rank("assignment", assignment, ("batch", "tokens")) != (B, N):
        raise ValueError(f"assignment has shape {assignment.shape}; expected [B={B}, N={N}]")
    _checks.check_int_array("assignment", assignment)
    g = _checks.positive_int("group", group)
    if (center_k is None) != (center_v is None):
        raise ValueError("center_k and center_v come together (both or neither)")
    if center_k is not None:
        ck = _checks.check_rank("center_k", center_k, ("batch", "centers", "kv_heads", "head_dim"))
        cv = _checks.check_rank("center_v", center_v, ("batch", "centers", "kv_heads", "v_head_dim"))
        if ck[0] not in (1, B) or ck[2:] != (K, D) or cv[:3] != ck[:3] or cv[3] != E:
            raise ValueError(
                f"center_k / center_v have shapes {ck} / {cv}; expected [B={B} or 1, M, K={K}, D={D}] "
                f"and [.., M, K, E={E}]"
            )

    perm = jnp.argsort(assignment, axis=1, stable=True)  # [B, N]
    inverse = jnp.argsort(perm, axis=1)
    sort = lambda x: jnp.take_along_axis(x, perm[:, :, None, None], axis=1)
    qs, ks, vs = sort(q), sort(k), sort(v)
    ng = -(-N // g)

    def reference():
        def allowed(b, h, i, j):
            d = j // g - i // g
            return (d == 0) | (d == 1)

        return attention(qs, ks, vs, mask=masks.from_fn(allowed), scale=scale, implementation="reference")

    def grouped(impl):
        def run():
            pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - N), (0, 0), (0, 0)))
            qg = pad(qs, ng * g).reshape(B * ng, g, H, D)
            # keys of group t: sorted positions [t g, t g + 2 g), padding (>= N) masked
            index = (jnp.arange(ng) * g)[:, None] + jnp.arange(2 * g)  # [ng, 2g]
            kg = pad(ks, (ng + 1) * g)[:, index].reshape(B * ng, 2 * g, K, D)
            vg = pad(vs, (ng + 1) * g)[:, index].reshape(B * ng, 2 * g, K, E)
            valid = jnp.broadcast_to((index < N)[None, :, None, None, :], (B, ng, 1, g, 2 * g))
            mask = masks.dense(valid.reshape(B * ng, 1, g, 2 * g))
            out = attention(qg, kg, vg, mask=mask, scale=scale, implementation=impl)
            return out.reshape(B, ng * g, H, E)[:, :N]

        return run

    impls = {"reference": reference, "xla": grouped("xla"), "pallas": grouped("pallas")}
    out = dispatch.run("token_aggregation_attention", impls, implementation)
    if center_k is not None:
        size = lambda c: jnp.broadcast_to(c, (B,) + c.shape[1:]).astype(q.dtype)
        impl = "reference" if implementation == "reference" else implementation
        out = out + attention(qs, size(center_k), size(center_v), scale=scale, implementation=impl)
    return jnp.take_along_axis(out, inverse[:, :, None, None], axis=1)
