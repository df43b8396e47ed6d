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


def test_pma_zero_query_key_weights_attend_uniformly():
    pma = nn.PMA(4, 2, 2, rngs=nnx.Rngs(0))
    for lin in (pma.mab.fc_q, pma.mab.fc_k):
        lin.kernel[...] = jnp.zeros_like(lin.kernel[...])
    z = normal(jax.random.key(1), (1, 5, 4))
    q = pma.mab.fc_q(pma.seeds[...])  # the projected seeds (bias only)
    o = q + pma.mab.fc_v(z).mean(1, keepdims=True)
    want = o + jax.nn.relu(pma.mab.fc_o(o))
    assert_close(pma(z), want, 1e-5, "uniform PMA")


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
