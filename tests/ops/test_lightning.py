"""Lightning attention: every implementation against the float32 token recurrence.

``LightningSuite`` holds the tests; ``TestXla`` and ``TestPallas`` (interpret mode on CPU) are
its subclasses. Outputs, final states and the gradients of q, k, v, the initial state and the
log decay are compared by relative RMSE (the fla convention: accumulation orders differ), with
the reference run on float32 upcasts of the very inputs the candidate sees.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import ops
from attnjax.ops.lightning import common, reference
from tests import harness
from tests.suites import LIGHTNING_TOL as TOL
from tests.suites import check_lightning_no_memory as check_no_memory
from tests.suites import check_lightning_poison as check_poison
from tests.suites import lightning_inputs as _inputs

# Per head: none, weak, medium, strong (lambda^64 underflows to 0 in float32 at the last one).
DECAYS = jnp.array([0.0, -0.01, -0.5, -3.0])


def _segments(B, T, n_docs=4, seed=5):
    return jnp.sort(jax.random.randint(jax.random.key(seed), (B, T), 0, n_docs), axis=1)


def compare(fn, ref_fn, args, dtype, what="", loose=None):
    """Outputs (the output and the final state) and gradients by relative RMSE (accumulation
    orders differ), with lightning's tolerances."""
    return harness.check_vjp(fn, ref_fn, args, dtype, key=jax.random.key(11), what=what, err=harness.rel_rmse,
                             tol=TOL[jnp.dtype(dtype).type], loose=loose)


class LightningSuite:
    implementation = "xla"
    block_size = 32
    def test_poison_stays_in_its_document(self):
        check_poison(self.op)

    def test_no_memory(self):
        check_no_memory(self.op)

    def op(self, q, k, v, **kw):
        return ops.lightning_attention(q, k, v, implementation=self.implementation,
                                       block_size=self.block_size, return_final_state=True, **kw)

    @staticmethod
    def ref(q, k, v, **kw):
        return ops.lightning_attention(q, k, v, implementation="reference", return_final_state=True, **kw)

    def check(self, B, T, H, K, D, E, dtype=jnp.float32, segments=False, **kw):
        q, k, v, s0 = _inputs(B, T, H, K, D, E)
        seg = _segments(B, T) if segments else None
        # log_decay and initial_state are arguments, so their gradients are checked too.
        fn = lambda op: lambda q, k, v, s0, a: op(q, k, v, initial_state=s0, log_decay=a, segment_ids=seg, **kw)
        a = DECAYS[:H] if H <= 4 else jnp.linspace(0.0, -3.0, H)
        # d log_decay = sum_t (t + 1)(q_t . dq_t - k_t . dk_t) + ... sums many cancelling terms, so
        # bf16 rounding of the chunk products shows up in it more than in dq, dk themselves.
        loose = {"grad[4]": 2e-2} if dtype == jnp.bfloat16 else None
        return compare(fn(self.op), fn(self.ref), (q, k, v, s0, a), dtype, what=f"T={T}", loose=loose)

    @pytest.mark.parametrize("T", [1, 63, 500, 913])
    def test_matches_recurrence(self, T):
        self.check(1, T, 4, 4, 12, 20)

    @pytest.mark.parametrize("T", [63, 500])
    def test_bf16(self, T):
        self.check(1, T, 4, 4, 16, 8, jnp.bfloat16)

    def test_grouped_query(self):
        self.check(2, 70, 4, 2, 8, 12)

    @pytest.mark.parametrize("T", [63, 500])
    def test_segment_ids(self, T):
        self.check(2, T, 2, 2, 8, 4, segments=True)

    def test_segments_are_independent(self):
        """A packed row equals running each document alone (the first with the initial state)."""
        B, T, H, D, E = 1, 90, 2, 8, 6
        q, k, v, s0 = _inputs(B, T, H, H, D, E)
        bounds = [0, 17, 18, 61, 90]  # includes a one-token document
        seg = jnp.concatenate([jnp.full((hi - lo,), i) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])[None]
        a = jnp.array([-0.05, -0.7])
        op = jax.jit(self.op)  # one compile per call instead of op-by-op dispatch
        out, final = op(q, k, v, log_decay=a, initial_state=s0, segment_ids=seg)
        for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            sl = lambda x: x[:, lo:hi]
            o_i, f_i = op(sl(q), sl(k), sl(v), log_decay=a, initial_state=s0 if i == 0 else None)
            np.testing.assert_allclose(out[:, lo:hi], o_i, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(final, f_i, rtol=1e-5, atol=1e-5)

    def test_strong_decay_is_finite(self):
        """A decay that underflows within one chunk gives finite values and gradients."""
        q, k, v, _ = _inputs(1, 100, 2, 2, 8, 8)
        f = lambda q, k, v: self.op(q, k, v, log_decay=jnp.array([-80.0, -1e4]))[0]
        out, vjp = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v))(q, k, v)
        grads = vjp(jnp.ones_like(out))
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)
        # With lambda ~ 0 each token sees only itself: o_t = scale (q_t . k_t) v_t.
        expect = (q * k).sum(-1, keepdims=True) / np.sqrt(8) * v
        np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-5)

    def test_decode_step_matches_last_row(self):
        B, T, H, K, D, E = 2, 40, 4, 2, 8, 12
        q, k, v, s0 = _inputs(B, T, H, K, D, E)
        a = -ops.lightning_slopes(H)
        op = jax.jit(self.op)
        full, final = op(q, k, v, log_decay=a, initial_state=s0)
        _, state = op(q[:, :-1], k[:, :-1], v[:, :-1], log_decay=a, initial_state=s0)
        step = jax.jit(functools.partial(ops.lightning_decode_step, log_decay=a))
        o, new = step(q[:, -1:], k[:, -1:], v[:, -1:], state)
        np.testing.assert_allclose(o, full[:, -1:], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(new, final, rtol=1e-5, atol=1e-5)

    def test_jit_with_traced_decay(self):
        """Decays traced under jit (learned, or computed per layer) work and get gradients."""
        q, k, v, _ = _inputs(1, 50, 2, 2, 8, 8)

        @jax.jit
        def loss(raw, q):
            out, _ = self.op(q, k, v, log_decay=-jax.nn.softplus(raw))
            return (out**2).sum()

        raw = jnp.array([0.3, -2.0])
        val, (g_raw, g_q) = jax.value_and_grad(loss, argnums=(0, 1))(raw, q)
        ref = lambda raw, q: (self.ref(q, k, v, log_decay=-jax.nn.softplus(raw))[0] ** 2).sum()
        rval, (rg_raw, rg_q) = jax.value_and_grad(ref, argnums=(0, 1))(raw, q)
        np.testing.assert_allclose(val, rval, rtol=1e-5)
        assert harness.rel_rmse(g_raw, rg_raw) < 1e-4 and harness.rel_rmse(g_q, rg_q) < 1e-5

    @pytest.mark.slow
    def test_bf16_long_with_segments(self):
        self.check(2, 913, 4, 2, 16, 24, jnp.bfloat16, segments=True)


class TestXla(LightningSuite):
    implementation = "xla"


class TestPallas(LightningSuite):
    implementation = "pallas"


@pytest.mark.parametrize("form", ["recurrence", "dense"])
def test_references_confine_poison_and_forget(form):
    """Both references: poison stays in its document after its token; lambda = 0 is no memory."""
    fn = getattr(reference, form)

    def op(q, k, v, log_decay, segment_ids=None):
        B, T, H, D = q.shape
        s0 = jnp.zeros((B, H, D, v.shape[-1]))
        return fn(q, k, v, log_decay, common.doc_ids(segment_ids, B, T), s0, D**-0.5)

    check_poison(op)
    check_no_memory(op)


# -- the references, the API edge and the decay builders ------------------------------------------


@pytest.mark.parametrize("segments", [False, True], ids=["one_doc", "segments"])
def test_dense_matches_recurrence(segments):
    B, T, H, D, E = 2, 77, 4, 8, 6
    q, k, v, s0 = _inputs(B, T, H, H, D, E)
    docs = common.doc_ids(_segments(B, T) if segments else None, B, T)
    f = lambda fn: lambda q, k, v, s0, a: fn(q, k, v, a, docs, s0, 0.4)
    compare(f(reference.dense), f(reference.recurrence), (q, k, v, s0, DECAYS), jnp.float32)


def test_no_decay_is_causal_linear_attention():
    q, k, v, _ = _inputs(1, 30, 2, 2, 4, 4)
    s = jnp.einsum("bthd,bshd->bhts", q, k) * 0.5
    expect = jnp.einsum("bhts,bshe->bthe", jnp.tril(s), v)
    np.testing.assert_allclose(ops.lightning_attention(q, k, v, scale=0.5), expect, rtol=1e-5, atol=1e-5)


def test_default_dispatch_and_dtype():
    q, k, v, _ = _inputs(1, 20, 2, 2, 4, 4)
    out = ops.lightning_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 20, 2, 4)


def test_reused_segment_id_starts_a_new_document():
    q, k, v, _ = _inputs(1, 9, 1, 1, 4, 4)
    a = ops.lightning_attention(q, k, v, segment_ids=jnp.array([[0, 0, 0, 1, 1, 1, 0, 0, 0]]))
    b = ops.lightning_attention(q, k, v, segment_ids=jnp.array([[0, 0, 0, 1, 1, 1, 2, 2, 2]]))
    np.testing.assert_allclose(a, b)


def test_slopes():
    np.testing.assert_allclose(ops.lightning_slopes(8), 2.0 ** (-np.arange(1, 9)), rtol=1e-6)
    assert ops.lightning_slopes(6).shape == (6,)
    layer = ops.lightning_layer_slopes(8, 0, 4)
    np.testing.assert_allclose(layer, ops.lightning_slopes(8) * (1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(ops.lightning_layer_slopes(8, 3, 4), ops.lightning_slopes(8) * 1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="layer_idx"):
        ops.lightning_layer_slopes(8, 4, 4)


def _bad(name):
    q, k, v, s0 = _inputs(2, 10, 4, 2, 8, 6)
    call = functools.partial(ops.lightning_attention, q, k, v)
    return {
        "q_rank": (ValueError, "q must have rank 4", lambda: ops.lightning_attention(q[0], k, v)),
        "k_len": (ValueError, "k has shape", lambda: ops.lightning_attention(q, k[:, :5], v)),
        "v_heads": (ValueError, "v has shape", lambda: ops.lightning_attention(q, k, v[:, :, :1])),
        "heads_divide": (ValueError, "must divide", lambda: ops.lightning_attention(q[:, :, :3], k, v)),
        "dtype": (TypeError, "one dtype", lambda: ops.lightning_attention(q.astype(jnp.bfloat16), k, v)),
        "int_q": (TypeError, "floating-point", lambda: ops.lightning_attention(q.astype(jnp.int32), k, v)),
        "decay_shape": (ValueError, "log_decay must be a scalar or have shape", lambda: call(log_decay=jnp.zeros(3))),
        "decay_positive": (ValueError, "log_decay must be <= 0", lambda: call(log_decay=jnp.array([0.0, 0.1, 0.0, 0.0]))),
        "decay_nan": (ValueError, "log_decay must be <= 0", lambda: call(log_decay=jnp.array([0.0, jnp.nan, 0.0, 0.0]))),
        "scale_nan": (ValueError, "scale must be a finite number", lambda: call(scale=float("nan"))),
        "state_shape": (ValueError, "initial_state has shape", lambda: call(initial_state=s0[:, :2])),
        "segments_shape": (ValueError, "segment_ids has shape", lambda: call(segment_ids=jnp.zeros((2, 9), jnp.int32))),
        "segments_dtype": (TypeError, "segment_ids must be an integer", lambda: call(segment_ids=jnp.zeros((2, 10)))),
        "block_size": (ValueError, "block_size must be >= 1", lambda: call(block_size=0)),
        "implementation": (ValueError, "implementation must be", lambda: call(implementation="cuda")),
        "decode_len": (ValueError, "one token", lambda: ops.lightning_decode_step(q, k, v, s0)),
        "decode_state": (ValueError, "state has shape", lambda: ops.lightning_decode_step(q[:, :1], k[:, :1], v[:, :1], s0[..., :3])),
    }[name]


@pytest.mark.parametrize("name", ["q_rank", "k_len", "v_heads", "heads_divide", "dtype", "int_q", "decay_shape",
                                  "decay_positive", "decay_nan", "scale_nan", "state_shape", "segments_shape", "segments_dtype",
                                  "block_size", "implementation", "decode_len", "decode_state"])
def test_bad_inputs(name):
    error, match, fn = _bad(name)
    with pytest.raises(error, match=match):
        fn()


def test_decode_step_reset_and_gqa():
    q, k, v, s0 = _inputs(2, 1, 4, 2, 8, 6)
    a = jnp.array([0.0, -0.1, -1.0, -5.0])
    o, s = ops.lightning_decode_step(q, k, v, s0, log_decay=a, reset=jnp.array([True, False]))
    fresh, s_fresh = ops.lightning_attention(q[:1], k[:1], v[:1], log_decay=a, return_final_state=True)
    carried, s_carried = ops.lightning_attention(q[1:], k[1:], v[1:], log_decay=a, initial_state=s0[1:],
                                                 return_final_state=True)
    np.testing.assert_allclose(o, jnp.concatenate([fresh, carried]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s, jnp.concatenate([s_fresh, s_carried]), rtol=1e-5, atol=1e-6)
