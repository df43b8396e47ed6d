"""The differentiation shared by every flash kernel family (GPU/interpret and TPU): one
``custom_vjp`` around a forward and a backward built from kernels."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def flash_vjp(forward, backward, kernel: str):
    """``f(static, q, k, v, tables, arrays) -> (out, lse)`` computed by ``forward`` (same
    arguments) and differentiated by ``backward(static, q, k, v, tables, arrays, out, lse, d_out,
    d_lse) -> (dq, dk, dv)``; ``static`` is not differentiated, nor are ``tables`` (visit lists).

    ``arrays`` (the problem's mask / score-mod / normalizer arrays) get no gradient: with
    ``symbolic_zeros`` the forward rule sees which arguments are differentiated and declines
    (``NotImplementedError``, at trace time, so dispatch falls back to xla) when any of them is,
    instead of returning a silently zero gradient for a learned ALiBi slope.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def flash(static, q, k, v, tables, arrays):
        return forward(static, q, k, v, tables, arrays)

    def flash_fwd(static, q, k, v, tables, arrays):
        if any(x.perturbed for x in jax.tree.leaves(arrays, is_leaf=_is_primal)):
            raise NotImplementedError(f"the {kernel} does not differentiate score-mod or normalizer parameters")
        value = lambda tree: jax.tree.map(lambda x: x.value, tree, is_leaf=_is_primal)
        q, k, v, tables, arrays = value((q, k, v, tables, arrays))
        out, lse = forward(static, q, k, v, tables, arrays)
        return (out, lse), (q, k, v, tables, arrays, out, lse)

    def flash_bwd(static, res, cotangents):
        q, k, v, tables, arrays, out, lse = res
        d_out, d_lse = cotangents
        d_out = jnp.zeros_like(out) if _is_zero(d_out) else d_out
        d_lse = jnp.zeros_like(lse) if _is_zero(d_lse) else d_lse
        dq, dk, dv = backward(static, q, k, v, tables, arrays, out, lse, d_out, d_lse)
        none = lambda tree: jax.tree.map(lambda _: None, tree)
        return dq, dk, dv, none(tables), none(arrays)

    flash.defvjp(flash_fwd, flash_bwd, symbolic_zeros=True)
    return flash


def _is_primal(x) -> bool:
    return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


def _is_zero(x) -> bool:
    return isinstance(x, jax.custom_derivatives.SymbolicZero)
