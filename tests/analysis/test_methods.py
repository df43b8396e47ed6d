"""Known-answer tests of rollout, flow, head importance, pruning, detectors and views."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import analysis, masks, nn, ops


@pytest.mark.parametrize("normalizer", ["softmax", pytest.param("sigmoid", marks=pytest.mark.slow)])
def test_blockwise_stats_equal_dense(normalizer):
    kq, kk, kb = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 19, 4, 8))
    k = jax.random.normal(kk, (2, 23, 2, 8))
    bias = jax.random.normal(kb, (1, 4, 19, 23))
    cfg = analysis.StatsConfig(block_k=8, top_k=3, first_k=2, num_offsets=4, window=3)
    cases = dict(
        softmax=(ops.attention, dict(mask=masks.causal(), bias=bias)),
        sigmoid=(ops.sigmoid_attention, dict(is_causal=True)),
    )
    for op, kw in [cases[normalizer]]:
        dense = analysis.weight_stats(analysis.attention_weights(op, q, k, **kw), cfg)
        block = analysis.blockwise_stats(q, k, op=op, config=cfg, **kw)
        assert set(dense) == set(block)
        for name in dense:
            np.testing.assert_allclose(block[name], dense[name], atol=2e-5, err_msg=name)


def test_stats_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, H, T, S\]"):
        analysis.weight_stats(jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="block_k"):
        analysis.StatsConfig(block_k=0)


def test_rollout_and_flow_of_identity_are_identity():
    eye = jnp.broadcast_to(jnp.eye(5), (1, 3, 5, 5))
    for fusion in ("mean", "max", "min"):
        np.testing.assert_allclose(analysis.rollout([eye] * 3, head_fusion=fusion)[0], np.eye(5), atol=1e-6)
    np.testing.assert_allclose(analysis.flow([eye, eye])[0], np.eye(5), atol=1e-9)
    g = analysis.rollout([eye, eye], grads=[jnp.ones_like(eye)] * 2)
    np.testing.assert_allclose(g[0], np.eye(5), atol=1e-6)
    with pytest.raises(ValueError, match="head_fusion"):
        analysis.rollout([eye], head_fusion="median")


def test_max_flow_known_graph():
    # s=0 -> 1 (3), s -> 2 (2), 1 -> 2 (1), 1 -> t=3 (2), 2 -> t (3): max flow 5
    cap = np.zeros((4, 4))
    cap[0, 1], cap[0, 2], cap[1, 2], cap[1, 3], cap[2, 3] = 3, 2, 1, 2, 3
    assert analysis.max_flow(cap, 0, 3) == pytest.approx(5.0)


def test_rollout_mixes_through_uniform_layer():
    uni = jnp.full((1, 1, 4, 4), 0.25)
    r = analysis.rollout([uni], residual=False)
    np.testing.assert_allclose(r[0], np.full((4, 4), 0.25))
    f = analysis.flow([uni, uni], residual=False)
    assert f.shape == (1, 4, 4) and np.all(f > 0)


def _planted(T=12):
    """Head 0 attends to the previous token (the first to itself), head 1 puts 0.8 on key 0."""
    prev = np.zeros((T, T))
    prev[0, 0] = 1.0
    prev[np.arange(1, T), np.arange(T - 1)] = 1.0
    sink = np.tril(np.ones((T, T))) * 0.2 / np.maximum(np.arange(T)[:, None], 1)
    sink[:, 0] = 0.8
    sink[0, 0] = 1.0
    sink = np.tril(sink)
    return jnp.asarray(np.stack([prev, sink])[None], jnp.float32)


def test_detectors_find_planted_heads():
    w = _planted()
    prev = analysis.previous_token_score(w)
    assert prev[0] == pytest.approx(1.0) and prev[1] < 0.5
    report = analysis.sinks(w, causal=True)
    assert report.sinks[1] == [0] and report.heads() == [1]
    assert (0, 1, 1.0) == tuple(
        round(x, 5) if isinstance(x, float) else x for x in analysis.offset_heads(w)[0]
    )
    h = analysis.entropy(w)
    assert h[0] == pytest.approx(0.0, abs=1e-6) and h[1] > 0.3
    assert analysis.waad(w)[0] == pytest.approx(11 / 12)
    # copy: a sequence that repeats; head 0 attends to the previous token, which never holds the
    # next token here, while a head looking at "one after the earlier occurrence" would
    tokens = jnp.array([[5, 6, 7, 5, 6, 7]])
    induction = np.zeros((1, 1, 6, 6))
    induction[0, 0, :3, 0] = 1
    for t in range(3, 6):
        induction[0, 0, t, t - 2] = 1.0  # key holding the next token (t + 1 - 3)
    assert float(analysis.copy_score(jnp.asarray(induction), tokens)[0]) == pytest.approx(1.0)
    delim = analysis.delimiter_score(w[:, :, :, :], jnp.arange(12)[None] % 4, delimiters=[0])
    assert delim[1] > delim[0]


def test_massive_activations():
    h = jnp.ones((1, 6, 16)) * 0.1
    h = h.at[0, 0, 3].set(500.0)
    mask, top = analysis.massive_activations(h)
    assert mask[0].tolist() == [True] + [False] * 5


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.blocks = nnx.List([nn.TransformerBlock(8, 2, mask=masks.causal(), rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(8, 11, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _loss(model, batch):
    logits = model(batch[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[:, 1:, None], -1))


def test_pruning_a_dead_head_changes_nothing():
    model = Tiny(nnx.Rngs(0))
    out = model.blocks[0].attention.out
    out.kernel[...] = out.kernel[...].at[1].set(0.0)  # head 1 of layer 0 writes nothing
    batch = jax.random.randint(jax.random.key(1), (2, 9), 0, 11)
    base = float(_loss(model, batch))
    imp = analysis.head_importance(model, _loss, [batch], normalize=False)
    names = list(imp)
    assert len(names) == 2 and imp[names[0]][1] == 0.0 and imp[names[0]][0] > 0
    curve = analysis.pruning_curve(model, lambda m: _loss(m, batch), imp, steps=1)
    assert curve["order"][0] == (names[0], 1)
    assert curve["metric"][0] == pytest.approx(base, abs=1e-6)
    assert curve["metric"][1] == pytest.approx(base, abs=1e-6)
    assert float(_loss(model, batch)) == pytest.approx(base)  # gates removed afterwards
    assert not hasattr(model.blocks[0].attention, "attnjax_gate")


def test_views_return_figures():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from attnjax.analysis import views

    w = _planted(6)
    figs = [
        views.heatmap(w, mask=np.tril(np.ones((6, 6), bool))),
        views.rollout_image(analysis.rollout([w])[0][:4, :4], (2, 2)),
        views.qk_embedding(jnp.ones((1, 6, 2, 4)) * jnp.arange(6.0)[:, None, None], jnp.ones((1, 6, 1, 4))),
        views.head_bars({"a": [1.0, 2.0], "b": [0.5, 0.1]}),
        views.pruning_plot(dict(fraction=[0, 0.5, 1], metric=[1.0, 1.2, 3.0])),
    ]
    assert all(isinstance(f, Figure) for f in figs)
    with pytest.raises(ValueError, match="grid"):
        views.rollout_image(np.eye(5), (2, 2))
    import matplotlib.pyplot as plt

    plt.close("all")
