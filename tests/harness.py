"""Shared test machinery: inputs, tolerances, and value-and-gradient comparison.

Every op's suite compares an implementation with its reference the same way: the reference
runs on float32-upcast inputs (so it is the most accurate answer available), the candidate on
the test dtype; values and the gradients of every differentiable input (through ``jax.vjp``
with a random cotangent) are compared by max error relative to the reference's scale, with
per-dtype tolerances. Ops whose accumulation order differs a lot (recurrences) may compare by
relative RMSE instead (``rel_rmse``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Max |x - ref| / max|ref| allowed, per dtype, for values and for gradients.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}
GRAD_TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 4e-2, jnp.float16: 8e-3}


def tolerance(dtype, grad: bool = False) -> float:
    return (GRAD_TOLERANCE if grad else TOLERANCE)[jnp.dtype(dtype).type]


def rel_err(x, ref) -> float:
    """``max |x - ref| / max |ref|`` in float64 numpy (0 if both are zero)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max() if ref.size else 0.0
    return float(np.abs(x - ref).max() / scale) if scale > 0 else float(np.abs(x).max())


def rel_rmse(x, ref) -> float:
    """``||x - ref|| / ||ref||`` (the fla convention, for differing accumulation orders)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    norm = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / norm) if norm > 0 else float(np.linalg.norm(x))


def normal(key, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Shape:
    """An attention problem's sizes, with a readable test id."""

    B: int = 2
    T: int = 63
    S: int = 63
    H: int = 4
    K: int = 4
    D: int = 16
    E: int = 16

    def __str__(self):
        gqa = f"H{self.H}K{self.K}" if self.K != self.H else f"H{self.H}"
        return f"B{self.B}T{self.T}S{self.S}{gqa}D{self.D}E{self.E}"

    def qkv(self, key, dtype=jnp.float32, scale=1.0):
        kq, kk, kv = jax.random.split(key, 3)
        return (
            normal(kq, (self.B, self.T, self.H, self.D), dtype, scale),
            normal(kk, (self.B, self.S, self.K, self.D), dtype, scale),
            normal(kv, (self.B, self.S, self.K, self.E), dtype),
        )


def assert_close(x, ref, tol, what=""):
    err = rel_err(x, ref)
    assert np.all(np.isfinite(np.asarray(x, np.float32))), f"{what}: non-finite values"
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def check_vjp(fn, ref_fn, args, dtype, *, key=jax.random.key(7), what="", tol_scale=1.0):
    """Compares ``fn(*args)`` (args in ``dtype``) with ``ref_fn`` on float32 upcasts of ``args``.

    ``args`` is a tuple of pytrees; floating leaves are cast to ``dtype`` for ``fn`` and to
    float32 for ``ref_fn``. Values and the vjp of every argument with one random cotangent are
    compared (each side is one jitted computation). Returns ``(out, ref_out)``.
    """
    cast = lambda tree, dt: jax.tree.map(
        lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )

    def value_and_vjp(f):
        @jax.jit
        def run(args):
            out, vjp = jax.vjp(f, *args)
            ct = normal(key, out.shape, jnp.float32).astype(out.dtype)
            return out, vjp(ct)
        return run

    out, grads = value_and_vjp(fn)(cast(args, dtype))
    ref, ref_grads = value_and_vjp(ref_fn)(cast(args, jnp.float32))
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    assert_close(out, ref, tol_scale * tolerance(dtype), f"{what} value")
    flat, ref_flat = jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat), f"{what}: gradient structures differ"
    for (path, g), rg in zip(flat, ref_flat):
        if g.dtype == jax.dtypes.float0:
            continue
        assert_close(g, rg, tol_scale * tolerance(dtype, grad=True), f"{what} grad{jax.tree_util.keystr(path)}")
    return out, ref
