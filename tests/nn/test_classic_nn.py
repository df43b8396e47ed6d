"""Zoo part 4 modules (issue 23): Set Transformer blocks (permutation equivariance / invariance,
padding), graph attention layers; every parameter names its logical axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks, nn, ops
from attnjax.nn import sharding
from tests.harness import assert_close, normal

MODULES = {
    "mab": lambda r: nn.MAB(3, 5, 8, 2, ln=True, rngs=r),
    "sab": lambda r: nn.SAB(3, 8, 2, rngs=r),
    "isab": lambda r: nn.ISAB(3, 8, 2, 4, ln=True, rngs=r),
    "pma": lambda r: nn.PMA(8, 2, 3, rngs=r),
    "gat": lambda r: nn.GraphAttention(6, 4, 2, rngs=r),
    "gatv2": lambda r: nn.GraphAttention(6, 4, 2, version=2, rngs=r),
    "fit": lambda r: nn.FITBlock(8, 2, group_size=3, rngs=r),
    "additive": lambda r: nn.AdditiveAttention(4, 6, 8, num_heads=2, rngs=r),
    "bidaf": lambda r: nn.BiDAFAttention(5, rngs=r),
    "probe": lambda r: nn.EfficientProbe(8, 2, d_out=2, rngs=r),
    "mil": lambda r: nn.GatedMILPooling(6, 4, branches=3, rngs=r),
    "label": lambda r: nn.LabelAttention(6, 3, 4, rngs=r),
}


@pytest.mark.parametrize("name", MODULES)
def test_parameters_have_logical_axes(name):
    assert sharding.unannotated(MODULES[name](nnx.Rngs(0))) == []


def test_set_blocks_equivariant_invariant_and_padding():
    x = normal(jax.random.key(0), (2, 9, 3))
    perm = np.random.default_rng(0).permutation(9)
    sab, isab = nn.SAB(3, 8, 2, ln=True, rngs=nnx.Rngs(1)), nn.ISAB(3, 8, 2, 4, ln=True, rngs=nnx.Rngs(2))
    pma = nn.PMA(8, 2, 3, rngs=nnx.Rngs(3))

    @nnx.jit
    def run(sab, isab, pma, x, lengths):
        z = isab(x, lengths)
        return sab(x, lengths), z, pma(z, lengths)

    full = jnp.array([9, 9])
    s, z, p = run(sab, isab, pma, x, full)
    s2, z2, p2 = run(sab, isab, pma, x[:, perm], full)
    assert_close(s2, s[:, perm], 1e-5, "SAB equivariant")
    assert_close(z2, z[:, perm], 1e-5, "ISAB equivariant")
    assert_close(p2, p, 1e-5, "PMA invariant")
    # padded elements (garbage past the length) change nothing in the valid outputs
    lengths = jnp.array([6, 9])
    junk = x.at[0, 6:].set(100.0)
    _, za, pa = run(sab, isab, pma, x, lengths)
    _, zb, pb = run(sab, isab, pma, junk, lengths)
    assert_close(pb, pa, 1e-5, "PMA ignores padding")
    assert_close(zb[0, :6], za[0, :6], 1e-5, "ISAB ignores padding")


@pytest.mark.slow
def test_pma_zero_query_key_weights_attend_uniformly():
    pma = nn.PMA(4, 2, 2, rngs=nnx.Rngs(0))
    for lin in (pma.mab.fc_q, pma.mab.fc_k):
        lin.kernel[...] = jnp.zeros_like(lin.kernel[...])
    z = normal(jax.random.key(1), (1, 5, 4))
    q = pma.mab.fc_q(pma.seeds[...])  # the projected seeds (bias only)
    o = q + pma.mab.fc_v(z).mean(1, keepdims=True)
    want = o + jax.nn.relu(pma.mab.fc_o(o))
    assert_close(pma(z), want, 1e-5, "uniform PMA")


@pytest.mark.slow
def test_graph_attention_is_the_op_and_trains():
    h = normal(jax.random.key(2), (1, 11, 6))
    adj = jnp.asarray(np.random.default_rng(1).random((11, 11)) < 0.3) | jnp.eye(11, dtype=bool)
    layer = nn.GraphAttention(6, 4, 2, rngs=nnx.Rngs(0))
    wh = layer.w(h).reshape(1, 11, 2, 4)
    u = jnp.einsum("bnhe,he->bnh", wh, layer.a_dst[...])
    w = jnp.einsum("bnhe,he->bnh", wh, layer.a_src[...])
    want = ops.gat_attention(u, w, wh, masks.dense(adj[None, None]), implementation="reference").reshape(
        1, 11, 8
    )
    assert_close(layer(h, adj[None]), want, 1e-5, "GAT layer")
    v2 = nn.GraphAttention(6, 4, 2, version=2, concat=False, rngs=nnx.Rngs(0))
    grads = nnx.grad(lambda m: jnp.mean(m(h, adj[None]) ** 2))(v2)
    g = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert all(np.isfinite(np.asarray(a)).all() for a in g) and sum(float(jnp.abs(a).sum()) for a in g) > 0
    with pytest.raises(ValueError, match="adjacency"):
        layer(h, adj[None, :5])


@pytest.mark.slow
def test_fit_groups_communicate_only_through_latents():
    x = normal(jax.random.key(3), (1, 9, 8))
    z = normal(jax.random.key(4), (1, 3, 2, 8))
    x2 = x.at[:, 3:].add(normal(jax.random.key(6), (1, 6, 8)))  # perturb groups 1 and 2
    for global_layer, causal in ((False, False), (True, False), (True, True)):
        block = nn.FITBlock(
            8, 2, group_size=3, global_layer=global_layer, causal_groups=causal, rngs=nnx.Rngs(5)
        )
        run = nnx.jit(lambda b, x, z: b(x, z))
        (y, _), (y2, _) = run(block, x, z), run(block, x2, z)
        changed = float(jnp.abs(y2[:, :3] - y[:, :3]).max())
        if global_layer and not causal:
            assert changed > 1e-4, "group 0 must see the others through the global latents"
        else:  # no global layer, or causal over groups: group 0 sees no later group
            assert changed < 1e-5, f"group 0 changed by {changed}"
    with pytest.raises(ValueError, match="multiple of group_size"):
        block(x[:, :8], z)


@pytest.mark.slow
def test_classic_layers_are_their_ops_and_train():
    k = jax.random.split(jax.random.key(7), 3)
    q, kv = normal(k[0], (2, 3, 4)), normal(k[1], (2, 5, 6))
    att = nn.AdditiveAttention(4, 6, 8, num_heads=2, rngs=nnx.Rngs(0))
    a = att.w_query(q).reshape(2, 3, 2, 8)
    c = att.w_key(kv).reshape(2, 5, 2, 8)
    want = ops.additive_attention(
        a, c, jnp.broadcast_to(kv[:, :, None], (2, 5, 2, 6)), att.v[...], implementation="reference"
    ).reshape(2, 3, 12)
    assert_close(att(q, kv), want, 1e-5, "additive layer")
    h = normal(k[2], (2, 7, 6))
    mil = nn.GatedMILPooling(6, 4, branches=3, rngs=nnx.Rngs(1))
    z = mil(h, key=jax.random.key(0), top_k=2, p=0.5)
    assert z.shape == (2, 3, 6)
    assert_close(mil(h, key=jax.random.key(0), top_k=2, p=0.0), mil(h), 1e-6, "p = 0 is the identity")
    probe = nn.EfficientProbe(8, 2, d_out=2, rngs=nnx.Rngs(2))
    assert probe(normal(k[0], (2, 5, 8))).shape == (2, 4)
    bidaf = nn.BiDAFAttention(6, rngs=nnx.Rngs(3))
    assert bidaf(h, kv).shape == (2, 7, 24)
    for m, f in (
        (att, lambda m: jnp.mean(m(q, kv) ** 2)),
        (mil, lambda m: jnp.mean(m(h) ** 2)),
        (bidaf, lambda m: jnp.mean(m(h, kv) ** 2)),
    ):
        g = jax.tree.leaves(nnx.state(nnx.grad(f)(m), nnx.Param))
        assert (
            all(np.isfinite(np.asarray(x)).all() for x in g) and sum(float(jnp.abs(x).sum()) for x in g) > 0
        )


def test_label_attention_layer():
    layer = nn.LabelAttention(6, 3, 4, rngs=nnx.Rngs(0))
    x = normal(jax.random.key(8), (2, 5, 6))
    y, a = layer(x, jnp.array([5, 3]))
    assert y.shape == (2, 5, 6) and a.shape == (2, 3, 5)
    assert_close(a.sum(-1), jnp.ones((2, 3)), 1e-6, "each label's weights sum to 1")
    assert not np.asarray(a[1, :, 3:]).any()
