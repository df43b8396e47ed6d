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

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from attnjax import masks
from attnjax.masks import EMPTY, FULL, PARTIAL

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


def rel_rmse(x, ref, floor: float = 0.0) -> float:
    """``||x - ref|| / ||ref||`` (the fla convention, for differing accumulation orders).

    ``floor`` is an absolute RMS scale below which ``ref`` counts as zero: where a quantity is
    analytically zero its computed value is rounding noise, and noise over noise means nothing,
    so the error is taken relative to ``max(rms(ref), floor)`` (the scale the quantity has when
    it is not zero)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    norm = max(np.linalg.norm(ref), floor * np.sqrt(ref.size))
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


def check_vjp(fn, ref_fn, args, dtype, *, key=jax.random.key(7), what="", tol_scale=1.0, err=None,
              tol=None, loose=None):
    """Compares ``fn(*args)`` (args in ``dtype``) with ``ref_fn`` on float32 upcasts of ``args``:
    the one value-and-gradient checker of the suite, for ops with one output or several.

    ``args`` is a tuple of pytrees; floating leaves are cast to ``dtype`` for ``fn`` and to
    float32 for ``ref_fn``. Values and the vjp of every argument with one random cotangent per
    output are compared (each side is one jitted computation), by ``err`` (default
    :func:`rel_err`; :func:`rel_rmse` where accumulation orders differ) against ``tol`` (default
    the per-dtype :func:`tolerance` times ``tol_scale``, for values and gradients alike when
    given). ``loose`` maps a compared name (``"out[1]"``, ``"grad[4]"``) to its own tolerance.
    Returns ``(out, ref_out)``.
    """
    err = err or rel_err
    cast = lambda tree, dt: jax.tree.map(
        lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )

    def value_and_vjp(f):
        @jax.jit
        def run(args):
            out, vjp = jax.vjp(f, *args)
            outs = jax.tree.leaves(out)
            keys = [key] if isinstance(out, jax.Array) else list(jax.random.split(key, len(outs)))
            cts = [normal(kk, o.shape, jnp.float32).astype(o.dtype) for kk, o in zip(keys, outs)]
            return out, vjp(jax.tree.unflatten(jax.tree.structure(out), cts))
        return run

    out, grads = value_and_vjp(fn)(cast(args, dtype))
    ref, ref_grads = value_and_vjp(ref_fn)(cast(args, jnp.float32))
    limit = lambda name, grad: (loose or {}).get(
        name, tol if tol is not None else tol_scale * tolerance(dtype, grad=grad))

    def compare(name, x, r, grad):
        assert np.all(np.isfinite(np.asarray(x, np.float32))), f"{what} {name}: non-finite values"
        e, t = err(x, r), limit(name, grad)
        assert e <= t, f"{what} {name}: error {e:.3g} > {t:.3g}"

    chex.assert_trees_all_equal_shapes(out, ref)
    # The main (first) output comes in the input dtype; auxiliary ones (a final state, an lse)
    # may stay float32.
    first = jax.tree.leaves(out)[0]
    assert first.dtype == dtype, f"{what}: output dtype {first.dtype}, expected {dtype}"
    for (path, o), r in zip(jax.tree.leaves_with_path(out), jax.tree.leaves(ref)):
        compare(f"out{jax.tree_util.keystr(path)}", o, r, False)
    flat, ref_flat = jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat), f"{what}: gradient structures differ"
    for (path, g), rg in zip(flat, ref_flat):
        if g.dtype != jax.dtypes.float0:
            compare(f"grad{jax.tree_util.keystr(path)}", g, rg, True)
    return out, ref


def projections(module, x, context=None):
    """``(q, k, v)`` of an :mod:`attnjax.nn` attention module (built by
    ``nn.layers.head_projections``): queries from ``x``, keys and values from ``context`` (or ``x``)."""
    context = x if context is None else context
    return module.query(x), module.key(context), module.value(context)


def check_module_is_op(module, inputs, compare, *, what="", tol=2e-5, loss=None):
    """The one check that an :mod:`attnjax.nn` module is its op on its own projections.

    ``compare(module, *inputs)`` returns pairs ``(module output, the op on the module's
    projections)`` (see :func:`projections`); each pair must match within ``tol``. With ``loss``
    (``loss(module, *inputs) -> scalar``, e.g. ``lambda m, x: jnp.mean(m(x) ** 2)``) the module
    also trains: the gradient reaches its parameters, finite and not all zero. Everything runs in
    one ``nnx.jit`` program. Returns the pairs.
    """
    from flax import nnx

    @nnx.jit
    def run(module, *inputs):
        grads = nnx.grad(loss)(module, *inputs) if loss is not None else None
        return grads, compare(module, *inputs)

    grads, pairs = run(module, *inputs)
    for i, (got, want) in enumerate(pairs):
        assert_close(got, want, tol, f"{what} module vs op [{i}]")
    if loss is not None:
        g = jax.tree.leaves(nnx.state(grads, nnx.Param))
        assert g and all(np.isfinite(np.asarray(a)).all() for a in g), f"{what}: non-finite gradients"
        assert sum(float(jnp.abs(a).sum()) for a in g) > 0, f"{what}: all gradients are zero"
    return pairs


# -- mask cases shared by the mask and attention suites ------------------------------------------

MASK_BATCH = 2


def segments(seed, batch, length, n_docs=3):
    """Sorted random segment ids ``[batch, length]`` (int32, numpy)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.integers(0, n_docs, (batch, length)), axis=1).astype(np.int32)


def dense_tile_classes(dense, block_q, block_k):
    """Exact tile classes from a dense [..., T, S] mask (the slow, obviously right way)."""
    T, S = dense.shape[-2:]
    nq, nk = -(-T // block_q), -(-S // block_k)
    out = np.zeros(dense.shape[:-2] + (nq, nk), np.int8)
    for i in range(nq):
        for j in range(nk):
            tile = dense[..., i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k]
            out[..., i, j] = np.where(tile.all((-1, -2)), FULL, np.where(tile.any((-1, -2)), PARTIAL, EMPTY))
    return out


_LEAVES = st.one_of(
    st.just(masks.causal()),
    st.builds(masks.sliding_window, st.integers(0, 20), st.integers(0, 20)),
    st.builds(masks.chunked, st.integers(1, 24)),
    st.builds(masks.prefix_lm, st.integers(0, 40)),
    st.builds(lambda s: masks.document(jnp.asarray(segments(s, MASK_BATCH, 45)), jnp.asarray(segments(s + 1, MASK_BATCH, 45))),
              st.integers(0, 100)),
)
MASK_EXPRS = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.builds(lambda a, b: a & b, inner, inner),
        st.builds(lambda a, b: a | b, inner, inner),
        st.builds(lambda a: ~a, inner),
    ),
    max_leaves=4,
)
"""Random mask expressions (algebra over every primitive family) for property tests."""
