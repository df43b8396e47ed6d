"""The Pallas flash kernels (interpret mode on CPU) through the generic op's shared suite,
plus kernel-specific checks: odd lengths, head dims 32..256, the FlashAttention accuracy rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnjax import masks, ops
from tests import harness
from tests.harness import Shape
from tests.suites import AttentionSuite


class TestPallas(AttentionSuite):
    implementation = "pallas"
    supports_bias = False
    supports_param_grads = False


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
@pytest.mark.parametrize("D", [32, 60, 128, 256])
def test_head_dims(D, normalizer):
    s = Shape(B=1, T=40, S=40, H=2, K=1, D=D, E=D)
    harness.check_vjp(
        lambda q, k, v: ops.attention(q, k, v, mask=masks.causal(), normalizer=normalizer, implementation="pallas",
                                      block_sizes=ops.BlockSizes(16, 16)),
        lambda q, k, v: ops.attention(q, k, v, mask=masks.causal(), normalizer=normalizer, implementation="reference"),
        s.qkv(jax.random.key(0)), jnp.float32, what=f"D={D}")


@pytest.mark.slow
@pytest.mark.parametrize("T", [97, 200, 1025])
def test_odd_lengths(T):
    s = Shape(B=1, T=T, S=T, H=2, K=1, D=16, E=16)
    harness.check_vjp(
        lambda q, k, v: ops.attention(q, k, v, mask=masks.causal(), implementation="pallas",
                                      block_sizes=ops.BlockSizes(64, 64)),
        lambda q, k, v: ops.attention(q, k, v, mask=masks.causal(), implementation="reference"),
        s.qkv(jax.random.key(0)), jnp.float32, what=f"T={T}")


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_flash_attention_accuracy_rule(normalizer):
    """FlashAttention's rule: in bf16, the kernel's error against an f32 reference is at most
    twice that of a plain bf16 attention (XLA, bf16 weights) against the same reference."""
    s = Shape(B=2, T=128, S=128, H=4, K=2, D=64, E=64)
    q, k, v = s.qkv(jax.random.key(0), jnp.bfloat16)
    f32 = lambda x: x.astype(jnp.float32)
    kw = dict(mask=masks.causal(), normalizer=normalizer)
    exact = ops.attention(f32(q), f32(k), f32(v), implementation="reference", **kw)
    kernel = ops.attention(q, k, v, implementation="pallas", block_sizes=ops.BlockSizes(32, 32), **kw)

    # The same-precision baseline: logits and weights rounded to bf16, as a naive bf16 program does.
    G = s.H // s.K
    kr, vr = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    logits = (jnp.einsum("bthd,bshd->bhts", q, kr) * jnp.bfloat16(s.D**-0.5)).astype(jnp.bfloat16)
    allowed = masks.causal().materialize(s.T, s.S)
    if normalizer == "softmax":
        w = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf).astype(jnp.bfloat16), axis=-1)
    else:
        w = jnp.where(allowed, jax.nn.sigmoid(logits - jnp.bfloat16(jnp.log(s.S))), 0).astype(jnp.bfloat16)
    naive = jnp.einsum("bhts,bshe->bthe", w, vr)

    err = lambda x: float(jnp.abs(f32(x) - exact).max())
    assert err(kernel) <= 2 * err(naive), (err(kernel), err(naive))


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_each_pass_has_its_own_tiles(normalizer):
    """Forward, dq and dkv kernels on different tiles (the arrays padded to a common multiple,
    padding rows that no forward tile covers ignored by the backward) still match the reference,
    values and gradients, under a document-causal mask."""
    from tests.suites import AWKWARD, make_mask

    tiles = ops.BlockSizes(block_q=16, block_k=32, block_q_dq=32, block_k_dq=16, block_q_dkv=8, block_k_dkv=64)
    mask = make_mask("document_causal", AWKWARD)
    kw = dict(mask=mask, normalizer=normalizer)
    harness.check_vjp(lambda q, k, v: ops.attention(q, k, v, implementation="pallas", block_sizes=tiles, **kw),
                      lambda q, k, v: ops.attention(q, k, v, implementation="reference", **kw),
                      AWKWARD.qkv(jax.random.key(3)), jnp.float32, what="per-pass tiles")


def test_higher_order_autodiff_declines_to_xla():
    """The kernels serve first-order reverse mode; a gradient of a gradient declines at trace time
    (NotImplementedError), so ("pallas", "xla") gives the reference's second derivative."""
    q, k, v = Shape(B=1, T=16, S=16, H=2, K=1, D=8, E=8).qkv(jax.random.key(0))

    def second(impl):
        loss = lambda q: jnp.sum(ops.attention(q, k, v, mask=masks.causal(), implementation=impl) ** 3)
        return jax.grad(lambda q: jnp.sum(jax.grad(loss)(q) ** 2))

    with pytest.raises(NotImplementedError, match="first-order reverse mode only"):
        jax.make_jaxpr(second("pallas"))(q)
    harness.assert_close(jax.jit(second(("pallas", "xla")))(q), jax.jit(second("reference"))(q), 1e-4, "grad of grad")
