"""attnjax.nn: every module equals the op applied to its projections; gradients; nnx.jit;
training with optax and an orbax round trip; KV-cache decode equals the full forward; the Flax
adapter inside ``nnx.MultiHeadAttention`` equals Flax's own attention; linen wrappers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from attnjax import masks, nn, ops
from attnjax.ops.vision.agent import agent_attention_reference
from tests import harness

C, H = 16, 4
ref_attention = functools.partial(ops.attention, implementation="reference")


def _x(B=2, T=11, c=C, key=0):
    return jax.random.normal(jax.random.key(key), (B, T, c))


def _dense(x, lin):
    """A LinearGeneral from its parameters: ``x @ kernel (+ bias)`` over the last axis."""
    y = jnp.einsum("btc,c...->bt...", x, lin.kernel[...])
    return y + lin.bias[...] if lin.bias is not None else y


def _out(o, lin):
    y = jnp.einsum("bthd,hdc->btc", o, lin.kernel[...])
    return y + lin.bias[...] if lin.bias is not None else y


def _call(module, *args, **kw):
    return nnx.jit(lambda m, *a: m(*a, **kw))(module, *args)


# -- MultiHeadAttention -------------------------------------------------------------------------

MHA_CONFIGS = {
    "plain": dict(),
    "gqa_causal_bias": dict(num_kv_heads=2, mask=masks.causal(), use_bias=True),
    "qk_norm_gate": dict(qk_norm=True, output_gate=True, mask=masks.sliding_window(3)),
    "sigmoid": dict(attention_fn=functools.partial(ops.sigmoid_attention, sigmoid_bias=-1.0), qkv_features=24),
}


@pytest.mark.parametrize("name", list(MHA_CONFIGS))
def test_mha_is_op_on_projections(name):
    cfg = dict(MHA_CONFIGS[name])
    m = nn.MultiHeadAttention(H, C, rngs=nnx.Rngs(0), **cfg)
    x = _x()
    q, k, v = _dense(x, m.query), _dense(x, m.key), _dense(x, m.value)
    if cfg.get("qk_norm"):
        q, k = m.qk_norm(q, k)
    fn = cfg.get("attention_fn", ops.attention)
    o = fn(q, k, v, **({"mask": cfg["mask"]} if "mask" in cfg else {}))
    if cfg.get("output_gate"):
        o = o * jax.nn.sigmoid(_dense(x, m.gate.proj))
    harness.assert_close(_call(m, x), _out(o, m.out), 1e-5, name)


def test_mha_cross_attention_and_call_mask():
    m = nn.MultiHeadAttention(H, C, num_kv_heads=1, rngs=nnx.Rngs(0))
    x, ctx = _x(T=5), _x(T=9, key=1)
    seg_q = jnp.array([[0, 0, 1, 1, 1]] * 2)
    seg_kv = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]] * 2)
    mask = masks.document(seg_q, seg_kv)
    o = ref_attention(_dense(x, m.query), _dense(ctx, m.key), _dense(ctx, m.value), mask=mask)
    harness.assert_close(_call(m, x, ctx, mask=mask), _out(o, m.out), 1e-5, "cross")


def test_mha_gradients_xla_equal_reference():
    x = _x()
    ct = jax.random.normal(jax.random.key(9), x.shape)

    def grads(impl):
        m = nn.MultiHeadAttention(H, C, num_kv_heads=2, qk_norm=True, mask=masks.causal(), rngs=nnx.Rngs(0),
                                  attention_fn=functools.partial(ops.attention, implementation=impl))
        return nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) * ct), argnums=(0, 1)))(m, x)

    (g, gx), (rg, rgx) = grads("xla"), grads("reference")
    harness.assert_close(gx, rgx, 1e-4, "dx")
    leaves, ref_leaves = jax.tree.leaves(nnx.state(g, nnx.Param)), jax.tree.leaves(nnx.state(rg, nnx.Param))
    assert len(leaves) == len(ref_leaves) > 0
    for a, b in zip(leaves, ref_leaves):
        harness.assert_close(a, b, 1e-4, "param grad")
        assert np.abs(np.asarray(a)).max() > 0


def test_mha_jit_equals_eager():
    m = nn.MultiHeadAttention(H, C, mask=masks.causal(), rngs=nnx.Rngs(1))
    x = _x(T=6)
    harness.assert_close(_call(m, x), m(x), 1e-5, "jit vs eager")


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: nn.MultiHeadAttention(4, 16, num_kv_heads=3, rngs=nnx.Rngs(0)), ValueError, "must divide num_heads"),
        (lambda: nn.MultiHeadAttention(3, 16, rngs=nnx.Rngs(0)), ValueError, "divisible by num_heads"),
        (lambda: nn.MultiHeadAttention(4, 16, mask=jnp.ones((3, 3)), rngs=nnx.Rngs(0)), TypeError, "attnjax.masks mask"),
        (lambda: nn.MultiHeadAttention(4, 16, mask=masks.document(jnp.zeros((1, 3), int)), rngs=nnx.Rngs(0)),
         ValueError, "pass it on each call"),
        (lambda: nn.MultiHeadAttention(4, 16, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 8))), ValueError, "in_features=16"),
        (lambda: nn.MultiHeadAttention(4, 16, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 16)), decode=True), ValueError, "init_cache"),
        (lambda: nn.MultiHeadAttention(4, 16, rngs=nnx.Rngs(0), attention_fn=ops.lightning_attention)(
            jnp.ones((1, 3, 16)), decode=True), ValueError, r"call init_cache\(batch_size=...\)"),
        (lambda: nn.MultiHeadAttention(4, 16, rngs=nnx.Rngs(0)).init_cache(batch_size=1), ValueError, "needs max_length"),
    ],
    ids=["kv_heads", "qkv_features", "mask_type", "array_mask", "in_features", "no_cache", "no_state",
         "no_max_length"],
)
def test_mha_errors(make, err, match):
    with pytest.raises(err, match=match):
        make()


# -- decoding ---------------------------------------------------------------------------------------


def _decode(m, x, prefill, max_length, *, jit=True):
    """Prefill ``x[:, :prefill]`` then feed one token at a time; returns the concatenated outputs."""
    m.init_cache(batch_size=x.shape[0], max_length=max_length)
    step = nnx.jit(lambda m, x: m(x, decode=True)) if jit else (lambda m, x: m(x, decode=True))
    outs = [step(m, x[:, :prefill])] + [step(m, x[:, t:t + 1]) for t in range(prefill, x.shape[1])]
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize(
    "name, cfg, T, prefill, max_length",
    [
        pytest.param("causal", dict(num_kv_heads=2, qk_norm=True, output_gate=True, mask=masks.causal()), 12, 5, 16,
                     id="causal_gqa_qknorm_gate"),
        pytest.param("sigmoid", dict(mask=masks.causal(), attention_fn=functools.partial(ops.sigmoid_attention, sigmoid_bias=-2.0)),
                     9, 3, 12, id="sigmoid_fixed_bias"),
        # A window of 4 keys with a 4-slot cache: decoding runs past max_length.
        pytest.param("window", dict(mask=masks.sliding_window(3)), 10, 2, 4, id="window_past_max_length"),
    ],
)
def test_decode_equals_full_forward(name, cfg, T, prefill, max_length):
    m = nn.MultiHeadAttention(H, C, rngs=nnx.Rngs(0), **cfg)
    x = _x(T=T)
    full = _call(m, x)
    harness.assert_close(_decode(m, x, prefill, max_length), full, 1e-5, name)
    assert int(m.cache_index[...]) == T


@pytest.mark.parametrize("prefill", [1, 5])
def test_lightning_decode_with_recurrent_state(prefill):
    """A recurrent attention_fn decodes with a fixed [B, H, D, D] state, equal to the full forward."""
    lightning = functools.partial(ops.lightning_attention, log_decay=-0.1)
    m = nn.MultiHeadAttention(H, C, num_kv_heads=2, attention_fn=lightning, rngs=nnx.Rngs(0))
    x = _x(T=9)
    full = _call(m, x)
    harness.assert_close(_decode(m, x, prefill, None), full, 2e-5, "lightning decode")
    assert m.recurrent_state[...].shape == (x.shape[0], H, m.head_dim, m.head_dim)
    assert m.cached_key is None  # no KV cache grows
    with pytest.raises(ValueError, match="takes no mask"):
        m(x[:, :1], mask=masks.causal(), decode=True)


def test_decode_in_transformer_block():
    block = nn.TransformerBlock(C, H, norm="hybrid", mask=masks.causal(), num_kv_heads=2, rngs=nnx.Rngs(0))
    x = _x(T=7)
    full = _call(block, x)
    block.attention.init_cache(batch_size=2, max_length=8)
    step = nnx.jit(lambda b, x: b(x, decode=True))
    out = jnp.concatenate([step(block, x[:, :4])] + [step(block, x[:, t:t + 1]) for t in range(4, 7)], axis=1)
    harness.assert_close(out, full, 1e-5, "block decode")


def test_decode_errors():
    m = nn.MultiHeadAttention(H, C, mask=masks.causal(), rngs=nnx.Rngs(0))
    m.init_cache(batch_size=2, max_length=4)
    with pytest.raises(ValueError, match="batch_size=2"):
        m(_x(B=3, T=1), decode=True)
    with pytest.raises(ValueError, match="do not fit"):
        m(_x(T=5), decode=True)
    with pytest.raises(ValueError, match="cross attention"):
        m(_x(T=1), _x(T=3), decode=True)


# -- training and checkpointing ----------------------------------------------------------------------


def _block(seed):
    return nn.TransformerBlock(C, H, norm="hybrid", mask=masks.causal(), qk_norm=True, layer_scale=0.1,
                               rngs=nnx.Rngs(seed))


def test_train_then_orbax_round_trip(tmp_path):
    model = _block(0)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x = _x(T=8)
    target = jnp.roll(x, 1, axis=1)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, target)) for _ in range(6)]
    assert losses[-1] < losses[0], losses

    state = nnx.state(model)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=1))
    manager.save(6, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"losses": losses})))
    manager.wait_until_finished()

    fresh = _block(1)  # different initialization, same structure
    assert not np.allclose(_call(fresh, x), _call(model, x))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(fresh))
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    nnx.update(fresh, restored.state)
    assert restored.meta["losses"] == losses
    np.testing.assert_array_equal(_call(fresh, x), _call(model, x))
    manager.close()


# -- TransformerBlock and helpers -------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["pre", "hybrid"])
def test_block_composition(norm):
    b = nn.TransformerBlock(C, H, norm=norm, layer_scale=0.5, mask=masks.causal(), rngs=nnx.Rngs(0))
    x = _x(T=6)
    a = b.attention(b.attn_in_norm(x))
    if norm == "hybrid":
        a = b.attn_out_norm(a)
    h = x + a * b.attn_scale.gamma[...]
    f = b.mlp(b.mlp_in_norm(h))
    if norm == "hybrid":
        f = b.mlp_out_norm(f)
    harness.assert_close(_call(b, x), h + f * b.mlp_scale.gamma[...], 1e-5, norm)


def test_block_returns_moh_aux_loss():
    att = nn.MoHAttention(H, C, num_shared_heads=1, top_k=2, mask=masks.causal(), rngs=nnx.Rngs(0))
    block = nn.TransformerBlock(C, H, attention=att, rngs=nnx.Rngs(0))
    x = _x(T=5)
    y, aux = _call(block, x)
    _, expected = _call(att, block.attn_in_norm(x))
    assert y.shape == (2, 5, C) and aux.shape == ()
    np.testing.assert_allclose(aux, expected, rtol=1e-6)


def test_qk_norm_and_layer_scale():
    norm = nn.QKNorm(8, rngs=nnx.Rngs(0))
    q, k = norm(3.0 * jax.random.normal(jax.random.key(0), (2, 5, 3, 8)), jnp.ones((2, 4, 1, 8)))
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(q**2, -1)), 1.0, rtol=1e-3)
    np.testing.assert_allclose(k, 1.0, rtol=1e-3)
    with pytest.raises(ValueError, match="kind"):
        nn.QKNorm(8, kind="batch", rngs=nnx.Rngs(0))
    ls = nn.LayerScale(3, init_value=0.2)
    np.testing.assert_allclose(ls(jnp.ones((2, 3))), 0.2)


# -- AgentAttention and MoHAttention -------------------------------------------------------------------


@pytest.mark.parametrize("agents, x_shape", [(4, (2, 12, C)), ((2, 3), (1, 6, 7, C))], ids=["1d", "2d"])
def test_agent_module_is_op_on_projections(agents, x_shape):
    m = nn.AgentAttention(H, C, agents=agents, bias_size=3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), x_shape)
    grid = x_shape[1:-1]
    flat = x.reshape(x.shape[0], -1, C)
    q, k, v = _dense(flat, m.query), _dense(flat, m.key), _dense(flat, m.value)
    pooled = ops.pool_agents_1d(q, agents) if len(grid) == 1 else ops.pool_agents_2d(q, grid, agents)
    n = pooled.shape[1]
    resize = lambda t: jax.image.resize(t[...], (H, n, *grid), method="bilinear").reshape(H, n, -1)
    o = agent_attention_reference(q, k, v, pooled, agent_bias=resize(m.agent_bias_table)[None],
                                  query_bias=resize(m.query_bias_table).transpose(0, 2, 1)[None])
    dw = m.dwc(v.reshape(x.shape[0], *grid, -1)).reshape(v.shape)
    expected = _out(o + dw, m.out).reshape(x_shape)
    harness.assert_close(_call(m, x), expected, 1e-5, f"agent {agents}")
    if isinstance(agents, tuple):
        return  # gradients once (1-D) to save compile time
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(m)
    for leaf in jax.tree.leaves(nnx.state(g, nnx.Param)):
        assert np.isfinite(np.asarray(leaf)).all()
    assert np.abs(np.asarray(g.agent_bias_table[...])).max() > 0


def test_agent_module_errors():
    m = nn.AgentAttention(H, C, agents=(2, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="height, width"):
        m(jnp.ones((1, 9, C)))
    with pytest.raises(ValueError, match="smaller than the agent grid"):
        m(jnp.ones((1, 1, 4, C)))
    with pytest.raises(ValueError, match="int \\(1-D\\) or a pair"):
        nn.AgentAttention(H, C, agents=(2, 2, 2), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("skip", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["dense", "skip"])
def test_moh_module_is_op_on_projections(skip):
    m = nn.MoHAttention(6, 24, num_shared_heads=2, top_k=2, mask=masks.causal(), skip_unselected=skip,
                        block_q=4, rngs=nnx.Rngs(0))
    x = _x(T=10, c=24)
    q, k, v = _dense(x, m.query), _dense(x, m.key), _dense(x, m.value)
    route = lambda lin: x @ lin.kernel[...]
    res = ops.moh_attention(q, k, v, route(m.routed_router), top_k=2, shared_logits=route(m.shared_router),
                            mix_logits=route(m.mix_router), mask=masks.causal(), implementation="reference")
    y, aux = _call(m, x)
    harness.assert_close(y, _out(res.out, m.out), 1e-5, "moh")
    np.testing.assert_allclose(aux, res.aux_loss, rtol=1e-6)
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2) + m(x)[1]))(m)
    assert np.abs(np.asarray(g.routed_router.kernel[...])).max() > 0


def test_moh_module_errors():
    with pytest.raises(ValueError, match="at least one routed head"):
        nn.MoHAttention(4, C, num_shared_heads=4, top_k=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="top_k=4 must be <="):
        nn.MoHAttention(4, C, num_shared_heads=1, top_k=4, rngs=nnx.Rngs(0))


# -- the Flax adapter ----------------------------------------------------------------------------------


def _flax_pair(**kw):
    make = lambda fn: nnx.MultiHeadAttention(H, C, attention_fn=fn, decode=False, rngs=nnx.Rngs(0), **kw)
    return make(nn.flax_attention_fn()), make(nnx.dot_product_attention)


@pytest.mark.parametrize("case", ["plain", "causal", "padding_mask", "gqa_causal", "dtype"])
def test_flax_adapter_equals_flax(case):
    kw = dict(num_kv_heads=2) if case == "gqa_causal" else {}
    ours, theirs = _flax_pair(**kw)
    x = _x(T=7)
    call = dict(is_causal=case in ("causal", "gqa_causal"))
    if case == "padding_mask":  # the last two keys of batch element 1 are padding
        valid = jnp.array([[1] * 7, [1] * 5 + [0] * 2], bool)
        call["mask"] = nnx.make_attention_mask(jnp.ones((2, 7), bool), valid)
    if case == "dtype":
        ours, theirs = _flax_pair(dtype=jnp.bfloat16)
    f = lambda m: nnx.jit(lambda m, x: m(x, **call))(m, x)
    tol = 2e-2 if case == "dtype" else 1e-5
    harness.assert_close(f(ours).astype(jnp.float32), f(theirs).astype(jnp.float32), tol, case)


def test_flax_adapter_in_flax_decode():
    """Flax's own KV cache passes an occupancy mask [B, 1, 1, max_length] each step."""
    ours, theirs = _flax_pair()
    x = _x(T=5)
    outs = []
    for m in (ours, theirs):
        m.init_cache((2, 6, C))
        step = nnx.jit(lambda m, x: m(x, decode=True))
        outs.append(jnp.concatenate([step(m, x[:, t:t + 1]) for t in range(5)], axis=1))
    harness.assert_close(outs[0], outs[1], 1e-5, "flax decode")


def test_flax_adapter_op_kwargs_and_masks():
    """A mask fixed in op_kwargs is combined with Flax's: sliding window of 2 & causal."""
    fn = nn.flax_attention_fn(ops.attention, mask=masks.sliding_window(2), implementation="xla")
    q, k, v = harness.Shape(B=2, T=6, S=6, H=2, K=2, D=4, E=4).qkv(jax.random.key(0))
    band = masks.sliding_window(2).materialize(6, 6)
    # Every row keeps an allowed key (a fully masked row gives zeros here, the mean of V in Flax).
    extra = jnp.ones((2, 2, 6, 6), bool).at[1, 0, 3:, 3].set(False)
    ours = fn(q, k, v, mask=extra)
    theirs = nnx.dot_product_attention(q, k, v, mask=band & extra)
    harness.assert_close(ours, theirs, 1e-5, "op kwargs")
    # Extra leading batch axes are flattened and restored.
    q5, k5, v5 = (x.reshape(1, 2, *x.shape[1:]) for x in (q, k, v))
    harness.assert_close(fn(q5, k5, v5, mask=extra[None])[0], ours, 1e-6, "batch axes")


def test_flax_adapter_dropout_and_sow():
    """Flax's attention dropout reaches the op: training differs from eval, is reproducible
    from the dropout rng, and deterministic=True applies none."""
    m = nnx.MultiHeadAttention(H, C, attention_fn=nn.flax_attention_fn(), dropout_rate=0.3, decode=False,
                               rngs=nnx.Rngs(0, dropout=1))
    x = _x(T=5)
    eval_out = m(x, deterministic=True)
    train_out = m(x, deterministic=False, rngs=nnx.Rngs(dropout=7))
    again = m(x, deterministic=False, rngs=nnx.Rngs(dropout=7))
    assert float(jnp.abs(train_out - eval_out).max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(train_out), np.asarray(again))
    no_dropout = nnx.MultiHeadAttention(H, C, attention_fn=nn.flax_attention_fn(ops.agent_attention),
                                        dropout_rate=0.1, decode=False, rngs=nnx.Rngs(0, dropout=1))
    with pytest.raises(NotImplementedError, match="has no attention dropout"):
        no_dropout(x, deterministic=False)
    m2, _ = _flax_pair()
    with pytest.raises(NotImplementedError, match="sow_weights"):
        m2(_x(T=3), sow_weights=True)


def test_dense_mask_block_map_is_exact():
    allowed = jax.random.bernoulli(jax.random.key(0), 0.3, (2, 1, 13, 10))
    allowed = allowed.at[0, 0, :4, :4].set(True).at[:, :, 8:, 5:].set(False)
    bm = nn.dense_mask(allowed).block_map(13, 10, 4, 4, batch=2)
    pad = jnp.pad(allowed, ((0, 0), (0, 0), (0, 3), (0, 2)))
    tiles = pad.reshape(2, 1, 4, 4, 3, 4)
    any_, all_ = tiles.any((3, 5)), jnp.pad(allowed, ((0, 0), (0, 0), (0, 3), (0, 2)), constant_values=True).reshape(2, 1, 4, 4, 3, 4).all((3, 5))
    expected = jnp.where(any_, jnp.where(all_, masks.FULL, masks.PARTIAL), masks.EMPTY)
    np.testing.assert_array_equal(bm, expected)


# -- linen ---------------------------------------------------------------------------------------------


def test_linen_wrappers_train():
    from attnjax.nn import linen as attn_linen

    layer = attn_linen.TransformerBlock(C, H, norm="hybrid", mask=masks.causal())
    x = _x(T=5)
    variables = layer.init(jax.random.key(0), x)
    y = jax.jit(layer.apply)(variables, x)
    assert y.shape == x.shape
    np.testing.assert_array_equal(y, jax.jit(layer.apply)(variables, x))
    grads = jax.jit(jax.grad(lambda v: jnp.sum(layer.apply(v, x) ** 2)))(variables)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.slow
def test_linen_moh_returns_aux():
    from attnjax.nn import linen as attn_linen

    x = _x(T=5)
    moh = attn_linen.MoHAttention(H, C, num_shared_heads=1, top_k=1)
    out, aux = moh.apply(moh.init(jax.random.key(1), x), x)
    assert out.shape == x.shape and aux.shape == ()


# -- docs ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_docs_tour():
    """Every python block of docs/nn.md runs, in order, in one namespace."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[2] / "docs" / "nn.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/nn.md", "exec"), namespace)
