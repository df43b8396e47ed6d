"""Shared suites and checks: every implementation of ``ops.attention`` against the dense
reference, and the poison and no-memory checks every lightning implementation passes.

``AttentionSuite`` holds the tests; each implementation is a few-line subclass in its test file
(``tests/ops/test_attention.py`` for xla, ``tests/ops/test_attention_pallas.py`` for the kernels).
Tiles are small so that small inputs still cross many tiles, skip empty ones, and pad ragged edges.
This module holds no tests of its own (pytest collects only ``test_*.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnjax import masks, normalizers, ops, score_mods
from tests import harness
from tests.harness import Shape
from tests.harness import MASK_EXPRS

AWKWARD = Shape(B=2, T=63, S=100, H=4, K=2, D=60, E=24)


def _segments(key, batch, length, n_docs=3):
    return jnp.sort(jax.random.randint(key, (batch, length), 0, n_docs), axis=1)


def make_mask(kind, shape: Shape):
    seg_q = _segments(jax.random.key(1), shape.B, shape.T)
    seg_kv = _segments(jax.random.key(2), shape.B, shape.S)
    return {
        "none": None,
        "causal": masks.causal(),
        "window": masks.sliding_window(17),
        "window_lr": masks.sliding_window(9, 5),
        "chunked_causal": masks.chunked(16) & masks.causal(),
        "prefix_lm": masks.prefix_lm(jnp.array([7, 30])),
        "document": masks.document(seg_q, seg_kv),
        "document_causal": masks.document(seg_q, seg_kv) & masks.causal(),
        "not_window": ~masks.sliding_window(4, 4),
        "from_fn": masks.from_fn(lambda b, h, q, kv: (q * 7 + kv * 3 + h) % 5 != 0, heads=shape.H),
    }[kind]


# The first is what the fast tier runs (tests/conftest.py): partial tiles, segments and causality.
MASKS = ["document_causal", "none", "causal", "window", "window_lr", "chunked_causal", "prefix_lm",
         "document", "not_window", "from_fn"]


# -- poison: non-finite inputs reach only the entries the mask allows -------------------------------

POISON = Shape(B=1, T=40, S=40, H=2, K=1, D=8, E=8)


def _outputs_and_grads(op, **kw):
    """One jitted program: ``(out, (dq, dk, dv))`` of ``op`` with a fixed random cotangent."""
    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: op(q, k, v, **kw), q, k, v)
        return out, vjp(harness.normal(jax.random.key(9), out.shape).astype(out.dtype))
    return run


def check_poison_causal(op, normalizer: str, position: int = 25):
    """NaN in the key and +inf in the value at ``position``, causal mask: queries before it (which
    are masked from it) get exactly the outputs and ``dq`` they get from clean inputs, whatever the
    tiling; every query at or after it attends the poison and gets a non-finite output."""
    q, k, v = POISON.qkv(jax.random.key(0))
    run = _outputs_and_grads(op, mask=masks.causal(), normalizer=normalizer)
    out, (dq, _, _) = run(q, k.at[:, position].set(jnp.nan), v.at[:, position].set(jnp.inf))
    clean_out, (clean_dq, _, _) = run(q, k.at[:, position].set(0.0), v.at[:, position].set(0.0))
    p = position
    harness.assert_close(out[:, :p], clean_out[:, :p], 1e-6, "outputs of queries masked from the poison")
    harness.assert_close(dq[:, :p], clean_dq[:, :p], 1e-6, "dq of queries masked from the poison")
    seen = ~np.isfinite(np.asarray(out[:, p:])).reshape(POISON.B, POISON.T - p, -1).any(-1)
    assert seen.all(), "a query that attends a non-finite value must get a non-finite output"


def check_poison_padding(op):
    """Padding holding NaN (keys and values after ``L``, queries after ``L`` with no allowed key):
    outputs and every gradient equal those of zero padding, padded queries give zeros."""
    L = 29
    q, k, v = POISON.qkv(jax.random.key(0))
    pos_q, pos_kv = jnp.arange(POISON.T)[None], jnp.arange(POISON.S)[None]
    mask = masks.document(jnp.where(pos_q < L, 0, 2), jnp.where(pos_kv < L, 0, 1))
    run = _outputs_and_grads(op, mask=mask)
    pad = lambda x, value: x.at[:, L:].set(value)
    got = run(pad(q, jnp.nan), pad(k, jnp.nan), pad(v, -jnp.inf))
    want = run(pad(q, 0.0), pad(k, 0.0), pad(v, 0.0))
    for name, x, y in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        if name != "out":  # the gradient at a non-finite input is not defined: look at real tokens
            x, y = x[:, :L], y[:, :L]
        harness.assert_close(x, y, 1e-6, f"{name} with NaN padding")
    assert np.all(np.asarray(got[0][:, L:]) == 0), "queries with no allowed key give zeros"


class AttentionSuite:
    implementation = "xla"
    block_sizes = ops.BlockSizes(block_q=16, block_k=32)
    dtypes = (jnp.float32, jnp.bfloat16, jnp.float16)
    # An implementation without these raises NotImplementedError (so dispatch falls back).
    supports_bias = True
    supports_param_grads = True  # gradients of score-mod / normalizer parameters

    def op(self, q, k, v, **kw):
        return ops.attention(q, k, v, implementation=self.implementation, block_sizes=self.block_sizes, **kw)

    def ref(self, q, k, v, **kw):
        return ops.attention(q, k, v, implementation="reference", **kw)

    def check(self, shape: Shape, dtype=jnp.float32, *, tol_scale=1.0, **kw):
        """Values and q/k/v gradients of ``op`` against ``ref``; returns both outputs."""
        args = shape.qkv(jax.random.key(0))
        return harness.check_vjp(lambda q, k, v: self.op(q, k, v, **kw), lambda q, k, v: self.ref(q, k, v, **kw), args, dtype,
                                 what=f"{shape}", tol_scale=tol_scale)

    # -- masks x normalizers ------------------------------------------------------------------

    @pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
    @pytest.mark.parametrize("kind", MASKS)
    def test_masks(self, kind, normalizer):
        self.check(AWKWARD, mask=make_mask(kind, AWKWARD), normalizer=normalizer)

    @pytest.mark.parametrize("normalizer", ["relu", "identity", "custom"])
    def test_other_normalizers(self, normalizer):
        if normalizer == "custom":
            normalizer = normalizers.elementwise(lambda s: jnp.exp(-(s**2)))
        self.check(AWKWARD, mask=masks.causal(), normalizer=normalizer)

    # -- shapes ---------------------------------------------------------------------------------

    @pytest.mark.parametrize(
        "shape",
        [
            Shape(B=1, T=100, S=37, H=3, K=1, D=8, E=8),  # cross, T > S, multi-query
            Shape(B=2, T=37, S=100, H=6, K=2, D=32, E=20),  # cross, T < S, GQA
            Shape(B=1, T=1, S=77, H=4, K=4, D=16, E=16),  # a decode step
            Shape(B=3, T=5, S=5, H=1, K=1, D=4, E=4),  # tiny
            Shape(B=1, T=128, S=128, H=2, K=2, D=64, E=64),  # tile-aligned
        ],
        ids=str,
    )
    @pytest.mark.parametrize("kind", ["none", "causal"])
    def test_shapes(self, shape, kind):
        self.check(shape, mask=make_mask(kind, shape))

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
    @pytest.mark.parametrize("kind", ["causal", "document_causal"])
    def test_low_precision(self, kind, dtype):
        if dtype not in self.dtypes:
            pytest.skip(f"{self.implementation} does not support {dtype}")
        self.check(AWKWARD, dtype, mask=make_mask(kind, AWKWARD))

    # -- score mods and bias, with gradients of their parameters ----------------------------------

    @pytest.mark.parametrize(
        "mod",
        ["alibi", "softcap", "relative_bias", "temperature", "composed", "from_fn_params", "from_fn_plain"],
    )
    def test_score_mods(self, mod):
        H = AWKWARD.H
        params = {
            "alibi": score_mods.alibi_slopes(H),
            "softcap": jnp.float32(3.0),
            "relative_bias": harness.normal(jax.random.key(3), (H, 11)),
            "temperature": jnp.linspace(0.5, 2.0, H),
            "composed": (score_mods.alibi_slopes(H), harness.normal(jax.random.key(4), (H, 7))),
            "from_fn_params": harness.normal(jax.random.key(5), (H,)),
            "from_fn_plain": jnp.float32(0.0),
        }[mod]

        def build(p):
            if mod == "alibi":
                return score_mods.alibi(p)
            if mod == "softcap":
                return score_mods.softcap(p)
            if mod == "relative_bias":
                return score_mods.relative_bias(p)
            if mod == "temperature":
                return score_mods.temperature(p)
            if mod == "composed":
                return score_mods.compose(score_mods.alibi(p[0]), score_mods.relative_bias(p[1]),
                                          score_mods.softcap(4.0))
            if mod == "from_fn_params":
                return score_mods.from_fn(lambda w, s, b, h, q, kv: s + w[h] * jnp.cos(q - kv), p)
            return lambda s, b, h, q, kv: s * jnp.where((q + kv) % 2 == 0, 1.0, 0.5)

        m = masks.causal()
        qkv = AWKWARD.qkv(jax.random.key(0))
        if not self.supports_param_grads:
            # Parameters as constants: values and q/k/v gradients still go through the kernel.
            harness.check_vjp(lambda q, k, v: self.op(q, k, v, mask=m, score_mod=build(params)),
                              lambda q, k, v: self.ref(q, k, v, mask=m, score_mod=build(params)),
                              qkv, jnp.float32, what=mod)
            if mod != "from_fn_plain":
                self._check_fallback(lambda p, q: self.op(q, *qkv[1:], mask=m, score_mod=build(p)), params, qkv[0])
            return
        fn = jax.jit(lambda q, k, v, p: self.op(q, k, v, mask=m, score_mod=build(p)))
        harness.check_vjp(fn, lambda q, k, v, p: self.ref(q, k, v, mask=m, score_mod=build(p)),
                          (*qkv, params), jnp.float32, what=mod)

    def _check_fallback(self, f, params, q):
        """Differentiating parameters the kernel cannot must raise, and fall back when allowed."""
        with pytest.raises(NotImplementedError):
            jax.grad(lambda p: f(p, q).sum())(params)

    @pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
    @pytest.mark.parametrize("bias_shape", ["BHTS", "1HTS", "B11S", "11T1"])
    def test_bias(self, bias_shape, normalizer):
        s = AWKWARD
        full = dict(B=s.B, H=s.H, T=s.T, S=s.S)
        shape = tuple(1 if c == "1" else full[c] for c in bias_shape)
        bias = harness.normal(jax.random.key(6), shape)
        m = masks.causal()
        fn = lambda q, k, v, b: self.op(q, k, v, mask=m, bias=b, normalizer=normalizer)
        if not self.supports_bias:
            with pytest.raises(NotImplementedError):
                fn(*s.qkv(jax.random.key(0)), bias)
            return
        if bias_shape == "11T1" and normalizer == "softmax":
            # A per-row constant cancels in softmax: its gradient must vanish.
            g = jax.jit(jax.grad(lambda b: fn(*s.qkv(jax.random.key(0)), b).sum()))(bias)
            assert float(jnp.abs(g).max()) < 1e-4
            return
        harness.check_vjp(jax.jit(fn), lambda q, k, v, b: self.ref(q, k, v, mask=m, bias=b, normalizer=normalizer),
                          (*s.qkv(jax.random.key(0)), bias), jnp.float32, what=bias_shape)

    def test_learnable_sigmoid_bias(self):
        m = masks.causal()
        norm = lambda b: normalizers.sigmoid(b)
        if not self.supports_param_grads:
            q, k, v = AWKWARD.qkv(jax.random.key(0))
            self._check_fallback(lambda b, q: self.op(q, k, v, mask=m, normalizer=norm(b)), jnp.float32(-1.5), q)
            return
        fn = jax.jit(lambda q, k, v, b: self.op(q, k, v, mask=m, normalizer=norm(b)))
        harness.check_vjp(fn, lambda q, k, v, b: self.ref(q, k, v, mask=m, normalizer=norm(b)),
                          (*AWKWARD.qkv(jax.random.key(0)), jnp.float32(-1.5)), jnp.float32)

    # -- log-sum-exp --------------------------------------------------------------------------

    def test_lse_values_and_gradient(self):
        s = AWKWARD
        m = make_mask("document_causal", s)

        def loss(impl_fn):
            def f(q, k, v):
                out, lse = impl_fn(q, k, v, mask=m, return_lse=True)
                # Use lse in the loss so its cotangent reaches the backward pass.
                return out * jnp.tanh(jnp.where(jnp.isneginf(lse), 0.0, lse))[..., None]
            return f

        harness.check_vjp(jax.jit(loss(self.op)), loss(self.ref), s.qkv(jax.random.key(0)), jnp.float32)

    def test_lse_merges_split_keys(self):
        """Attention over [k1; k2] equals the lse-weighted merge of attention over each half."""
        s = Shape(B=1, T=40, S=96, H=2, K=2, D=16, E=16)
        q, k, v = s.qkv(jax.random.key(0))
        full = self.op(q, k, v)
        o1, l1 = self.op(q, k[:, :50], v[:, :50], return_lse=True)
        o2, l2 = self.op(q, k[:, 50:], v[:, 50:], return_lse=True)
        lse = jnp.logaddexp(l1, l2)
        merged = o1 * jnp.exp(l1 - lse)[..., None] + o2 * jnp.exp(l2 - lse)[..., None]
        harness.assert_close(merged, full, 1e-5, "merged")

    # -- numerics contract ------------------------------------------------------------------------

    @pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
    def test_fully_masked_rows_give_zeros(self, normalizer):
        s = AWKWARD
        q, k, v = s.qkv(jax.random.key(0))
        seg_q = jnp.zeros((s.B, s.T), jnp.int32).at[:, 5].set(9).at[:, 40:].set(9)
        m = masks.document(seg_q, jnp.zeros((s.B, s.S), jnp.int32))
        f = lambda q, k, v: self.op(q, k, v, mask=m, normalizer=normalizer)
        out = f(q, k, v)
        assert np.all(np.asarray(out[:, 5]) == 0) and np.all(np.asarray(out[:, 40:]) == 0)
        assert np.isfinite(np.asarray(out)).all()
        grads = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(q, k, v)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)
        if normalizer == "softmax":
            _, lse = self.op(q, k, v, mask=m, return_lse=True)
            assert np.all(np.isneginf(np.asarray(lse[:, 5])))

    # An implementation whose kernels do not yet confine non-finite inputs (xfail, strict).
    confines_poison = True

    def _poison_xfail(self, request):
        if not self.confines_poison:
            request.applymarker(pytest.mark.xfail(strict=True, reason="kernel part follows the GPU rewrite"))

    @pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
    def test_masked_poison_stays_masked(self, normalizer, request):
        self._poison_xfail(request)
        check_poison_causal(lambda q, k, v, **kw: self.op(q, k, v, **kw), normalizer)

    def test_poisoned_padding_is_invisible(self, request):
        self._poison_xfail(request)
        check_poison_padding(lambda q, k, v, **kw: self.op(q, k, v, **kw))

    def test_causal_more_queries_than_keys(self):
        """Bottom-right causal with T > S: the first T - S query rows are zeros."""
        s = Shape(B=1, T=50, S=20, H=2, K=2, D=8, E=8)
        out, _ = self.check(s, mask=masks.causal())
        assert np.all(np.asarray(out[:, :30]) == 0)

    def test_bf16_large_logits(self):
        """|logits| ~ 1e4 in bf16 inputs: float32 accumulation keeps the result right."""
        s = Shape(B=1, T=64, S=64, H=2, K=2, D=16, E=16)
        q, k, v = s.qkv(jax.random.key(0), jnp.bfloat16, scale=50.0)
        logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) / 4.0
        assert float(jnp.abs(logits).max()) > 8e3
        out = self.op(q, k, v, mask=masks.causal())
        ref = self.ref(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask=masks.causal())
        assert np.isfinite(np.asarray(out, np.float32)).all()
        harness.assert_close(out, ref, 1e-2, "bf16 large logits")

    def test_deterministic(self):
        s = AWKWARD
        q, k, v = s.qkv(jax.random.key(0))
        m = make_mask("document_causal", s)
        bias = harness.normal(jax.random.key(1), (1, s.H, s.T, s.S)) if self.supports_bias else None
        loss = lambda q, k, v, b: self.op(q, k, v, mask=m, bias=b).sum()
        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2) + ((3,) if self.supports_bias else ())))
        a, b = f(q, k, v, bias), f(q, k, v, bias)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def test_empty_tiles_are_skipped(self):
        """Keys in tiles the mask leaves empty are never read: NaNs there do not leak."""
        s = Shape(B=1, T=128, S=128, H=2, K=2, D=8, E=8)
        q, k, v = s.qkv(jax.random.key(0))
        v = v.at[:, 96:].set(jnp.nan)  # key tiles 3 of 4 (block_k=32) are empty for rows < 64
        out = self.op(q[:, :64], k, v, mask=masks.sliding_window(8, 0) & masks.from_fn(lambda b, h, q, kv: kv < 64))
        assert np.isfinite(np.asarray(out)).all()

    def test_under_jit_with_traced_segment_ids(self):
        s = AWKWARD
        q, k, v = s.qkv(jax.random.key(0))
        seg_q, seg_kv = _segments(jax.random.key(1), s.B, s.T), _segments(jax.random.key(2), s.B, s.S)
        f = jax.jit(lambda q, k, v, a, b: self.op(q, k, v, mask=masks.document(a, b) & masks.causal()))
        ref = self.ref(q, k, v, mask=masks.document(seg_q, seg_kv) & masks.causal())
        harness.assert_close(f(q, k, v, seg_q, seg_kv), ref, 2e-5, "traced ids")

    @pytest.mark.slow
    def test_random_compositions(self):
        """Hypothesis composes masks and score mods; forward and gradient match the reference."""
        shape = Shape(B=2, T=45, S=45, H=2, K=1, D=8, E=8)
        mods = {
            "none": None,
            "alibi": score_mods.alibi(score_mods.alibi_slopes(2)),
            "softcap": score_mods.softcap(2.0),
            "both": [score_mods.alibi(score_mods.alibi_slopes(2)), score_mods.softcap(2.0)],
        }

        # Built per call: every implementation's suite gets its own hypothesis test function.
        @settings(max_examples=8, deadline=None)
        @given(mask=MASK_EXPRS, mod=st.sampled_from(sorted(mods)), normalizer=st.sampled_from(["softmax", "sigmoid"]))
        def check(mask, mod, normalizer):
            self.check(shape, mask=mask, score_mod=mods[mod], normalizer=normalizer)

        check()


# -- lightning attention: poison and no-memory checks every implementation passes ---------------

LIGHTNING_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 5e-3}


def lightning_inputs(B, T, H, K, D, E, seed=0):
    kq, kk, kv, ks = jax.random.split(jax.random.key(seed), 4)
    return (harness.normal(kq, (B, T, H, D)), harness.normal(kk, (B, T, K, D)),
            harness.normal(kv, (B, T, K, E)), harness.normal(ks, (B, H, D, E)))


def check_lightning_poison(op, lengths=(40, 30, 30), P=25):
    """NaN in a key and inf in a value at token ``P`` of document 0 (``lengths``: tokens per
    document; by default tokens 0-39, documents 1 and 2 follow), and a NaN query 5 tokens before
    the end: every other token gets exactly its clean output and dq, and keys neither poisoned
    row attends (document 1, the last document after the NaN query) exactly their clean dk, dv;
    the final state is clean; the rest of document 0 and the NaN query get non-finite outputs.
    Documents longer than a chunk carry the poison in the state, and a later document that
    starts inside a chunk must drop it."""
    B, H, D, E = 1, 2, 8, 8
    T, end, Q = sum(lengths), lengths[0], sum(lengths) - 5
    q, k, v, _ = lightning_inputs(B, T, H, H, D, E)
    seg = jnp.repeat(jnp.arange(len(lengths)), jnp.array(lengths), total_repeat_length=T)[None]
    a = jnp.array([-0.1, -0.01])

    @jax.jit
    def run(q, k, v):
        (out, final), vjp = jax.vjp(lambda q, k, v: op(q, k, v, log_decay=a, segment_ids=seg), q, k, v)
        return out, final, *vjp((harness.normal(jax.random.key(9), out.shape), jnp.zeros_like(final)))

    out, final, *grads = run(q.at[:, Q].set(jnp.nan), k.at[:, P].set(jnp.nan), v.at[:, P].set(jnp.inf))
    clean_out, clean_final, *clean_grads = run(q.at[:, Q].set(0.0), k.at[:, P].set(0.0), v.at[:, P].set(0.0))
    unseen = np.r_[0:P, end:Q, Q + 1:T]  # rows that attend no poison
    unread = np.r_[end:T - lengths[-1], Q + 1:T]  # keys no poisoned row attends
    harness.assert_close(out[:, unseen], clean_out[:, unseen], 1e-6, "outputs of tokens that do not attend the poison")
    for name, g, clean, rows in zip(("dq", "dk", "dv"), grads, clean_grads, (unseen, unread, unread)):
        harness.assert_close(g[:, rows], clean[:, rows], 1e-6, f"{name} of tokens the poison does not touch")
    harness.assert_close(final, clean_final, 1e-6, "the final state (of the last document)")
    assert (~np.isfinite(np.asarray(out[:, np.r_[P:end, Q]]))).reshape(end - P + 1, -1).any(-1).all()


def check_lightning_no_memory(op, T=70):
    """``log_decay = -inf`` (lambda = 0): each token sees only itself, values and gradients
    finite, equal to the recurrence's."""
    q, k, v, _ = lightning_inputs(1, T, 2, 2, 8, 8)
    a = jnp.array([-jnp.inf, -0.5])
    out, _ = harness.check_vjp(lambda q, k, v: op(q, k, v, log_decay=a)[0],
                               lambda q, k, v: ops.lightning_attention(q, k, v, log_decay=a, implementation="reference"),
                               (q, k, v), jnp.float32, err=harness.rel_rmse, tol=LIGHTNING_TOL[jnp.float32])
    expect = (q * k).sum(-1, keepdims=True) / np.sqrt(8) * v
    np.testing.assert_allclose(out[:, :, 0], expect[:, :, 0], rtol=1e-5, atol=1e-6)
