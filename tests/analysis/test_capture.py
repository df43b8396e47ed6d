"""Capture: the weights of any op, and of attention layers inside NNX models, under nnx.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import analysis, masks, nn, ops


def _softmax_weights(q, k, causal):
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    if causal:
        T = q.shape[1]
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    return jax.nn.softmax(s, -1)


@pytest.mark.parametrize(
    "op, kwargs",
    [
        (ops.attention, dict(mask=masks.causal())),
        (ops.linear_attention, dict(is_causal=True)),
        (ops.sigmoid_attention, dict(local_window_size=2)),
        (ops.lightning_attention, dict(log_decay=-0.5)),
    ],
    ids=["softmax", "linear", "sigmoid", "lightning"],
)
def test_weights_reproduce_the_op(op, kwargs):
    key = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (2, 7, 2, 4)) for kk in key)
    w = analysis.attention_weights(op, q, k, **kwargs)
    assert w.shape == (2, 2, 7, 7)
    np.testing.assert_allclose(jnp.einsum("bhts,bshe->bthe", w, v), op(q, k, v, **kwargs), atol=2e-5)


def test_weights_reject_bad_shapes():
    with pytest.raises(ValueError, match="q and k"):
        analysis.attention_weights(ops.attention, jnp.ones((3, 2, 4)), jnp.ones((1, 3, 2, 4)))


def test_capture_mha_under_jit_layers_and_heads():
    block = lambda i: nn.TransformerBlock(8, 2, rngs=nnx.Rngs(i), mask=masks.causal())
    model = nnx.Sequential(block(0), block(1))
    x = jax.random.normal(jax.random.key(1), (1, 5, 8))
    layers = analysis.attention_layers(model)
    assert len(layers) == 2
    y0 = model(x)
    with analysis.capture(model, layers=[1], heads=[1]) as cap:
        y = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(y, y0, atol=1e-6)  # capturing changes nothing
    (name,) = cap.weights
    assert name == list(layers)[1]
    w = cap.weights[name][0]
    assert w.shape == (1, 1, 5, 5)
    assert not hasattr(layers[name], "attnjax_weights")
    assert layers[name].attention_fn is ops.attention  # restored


def test_capture_flax_mha_with_adapter():
    fm = nnx.MultiHeadAttention(2, 8, attention_fn=nn.flax_attention_fn(), decode=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 5, 8))
    with analysis.capture(fm, stats=analysis.StatsConfig(block_k=2)) as cap:
        nnx.jit(lambda m, x: m(x, is_causal=True))(fm, x)
    q = fm.query(x)
    k = fm.key(x)
    w = cap.weights[""][0]
    np.testing.assert_allclose(w, _softmax_weights(q, k, True), atol=1e-5)
    st = cap.stats[""][0]
    np.testing.assert_allclose(st["received"], w.sum(2), atol=1e-5)


def test_capture_needs_attention_layers():
    with pytest.raises(ValueError, match="no attention layer"):
        with analysis.capture(nnx.Linear(2, 2, rngs=nnx.Rngs(0))):
            pass
    model = nn.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="out of range"), analysis.capture(model, layers=[3]):
        pass


MODULES = {
    "moh": lambda: nn.MoHAttention(4, 16, num_shared_heads=1, top_k=2, rngs=nnx.Rngs(0)),
    "linear_global": lambda: nn.LinearGlobalAttention(2, 16, rngs=nnx.Rngs(0)),
    "agent": lambda: nn.AgentAttention(2, 16, agents=4, rngs=nnx.Rngs(0)),
    "selective": lambda: nn.SelectiveAttention(2, 16, rngs=nnx.Rngs(0)),
    "multi_token": lambda: nn.MultiTokenAttention(2, 16, kernel=(2, 3), rngs=nnx.Rngs(0)),
    "routing": lambda: nn.RoutingAttention(2, 16, num_clusters=2, window=4, rngs=nnx.Rngs(0)),
    "mega": lambda: nn.MegaLayer(16, ema_dim=4, qk_dim=8, rngs=nnx.Rngs(0)),
    "multi_axis": lambda: nn.MultiAxisAttention(2, 16, window=2, rngs=nnx.Rngs(0)),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_capture_every_nn_module(name):
    try:
        module = MODULES[name]()
    except TypeError as e:  # constructor signature: report it, do not hide the module
        pytest.fail(f"{name}: {e}")
    spatial = name in ("multi_axis", "linear_global")
    x = jax.random.normal(jax.random.key(2), (1, 4, 4, 16) if spatial else (1, 8, 16))
    with analysis.capture(module) as cap:
        nnx.jit(lambda m, x: m(x))(module, x)
    (w,) = cap.weights[""]
    assert w.ndim == 4 and w.shape[-1] == (16 if spatial else 8)
    assert bool(jnp.isfinite(w).all())
