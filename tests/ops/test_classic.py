"""Zoo part 4 ops (issue 23): additive attention, GAT/GATv2, the Set Transformer's MAB core,
and the rest of the set / classic / cross-modal family; each efficient path against its dense
reference (values and gradients, f32 and bf16, odd sizes) plus the spec's known answers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, ops
from tests.harness import assert_close, check_vjp, normal

# bfloat16 cases run in the slow tier (the fast tier's CPU budget); float32 ones always
DTYPES = [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)]
BS = ops.BlockSizes(block_q=8, block_k=8)


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


# -- additive (Bahdanau) ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_additive_xla_matches_reference(dtype):
    k = _keys(4)
    a, c = normal(k[0], (2, 13, 4, 6)), normal(k[1], (2, 11, 2, 6))
    v, w = normal(k[2], (2, 11, 2, 5)), normal(k[3], (4, 6))
    mask = masks.padding(jnp.array([11, 7]))
    run = lambda impl: (
        lambda a, c, v, w: ops.additive_attention(a, c, v, w, mask=mask, implementation=impl, block_sizes=BS)
    )
    check_vjp(run("xla"), run("reference"), (a, c, v, w), dtype, what="additive")


def test_additive_known_answer():
    # w = e_1 and features selecting one coordinate: the scores are tanh(q_1 + k_1)
    k = _keys(3, 1)
    a, c, v = normal(k[0], (1, 3, 1, 4)), normal(k[1], (1, 5, 1, 4)), normal(k[2], (1, 5, 1, 3))
    w = jnp.zeros((1, 4)).at[0, 0].set(1.0)
    e = jnp.tanh(a[0, :, 0, 0][:, None] + c[0, :, 0, 0][None])
    want = jax.nn.softmax(e, -1) @ v[0, :, 0]
    got = jax.jit(lambda *x: ops.additive_attention(*x, implementation="xla"))(a, c, v, w)
    assert_close(got[0, :, 0], want, 2e-5, "tanh(q1 + k1)")


@pytest.mark.slow
def test_context_pooling_is_softmax_pooling():
    k = _keys(3, 2)
    h, u, ctx = normal(k[0], (2, 7, 5)), jnp.tanh(normal(k[1], (2, 7, 3))), normal(k[2], (3,))
    want = jnp.einsum("bs,bsc->bc", jax.nn.softmax(u @ ctx, -1), h)
    assert_close(ops.context_pooling(h, u, ctx), want, 2e-5, "HAN pooling")


def test_additive_bad_shapes():
    a, c, v = jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 5, 2, 4)), jnp.zeros((1, 5, 2, 3))
    with pytest.raises(ValueError, match="w must have shape"):
        ops.additive_attention(a, c, v, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="k_feats"):
        ops.additive_attention(a, c[..., :3], v, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="activation"):
        ops.additive_attention(a, c, v, jnp.zeros((2, 4)), activation="gelu")


# -- GAT / GATv2 --------------------------------------------------------------------------------


def _graph(n, seed=0, p=0.3):
    rng = np.random.default_rng(seed)
    adj = (rng.random((n, n)) < p) | np.eye(n, dtype=bool)
    adj[3] = False  # a node that receives nothing: zeros
    receivers, senders = np.nonzero(adj)
    return jnp.asarray(adj), jnp.asarray(senders), jnp.asarray(receivers)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gat_dense_matches_edge_list(dtype):
    N, H, E = 19, 2, 5
    adj, snd, rcv = _graph(N)
    k = _keys(3, 3)
    u, w, v = normal(k[0], (2, N, H)), normal(k[1], (2, N, H)), normal(k[2], (2, N, H, E))
    mask = masks.dense(adj[None, None])
    fast = lambda u, w, v: ops.gat_attention(u, w, v, mask, implementation="xla", block_sizes=BS)
    ref = lambda u, w, v: ops.gat_edge_list(v, snd, rcv, jax.nn.leaky_relu(u[:, rcv] + w[:, snd], 0.2))
    # bf16 rounding of u + w can cross LeakyReLU's kink, where the slope jumps: looser score grads
    loose = {"grad[0]": 0.1, "grad[1]": 0.1} if dtype == jnp.bfloat16 else None
    out, _ = check_vjp(fast, ref, (u, w, v), dtype, what="gat", loose=loose)
    assert not np.asarray(out[:, 3], np.float32).any()  # no in-edges: zeros


@pytest.mark.slow
def test_gat_per_node_loop():
    N, H, E = 7, 1, 3
    adj, _, _ = _graph(N, 4, 0.5)
    k = _keys(3, 4)
    u, w, v = normal(k[0], (1, N, H)), normal(k[1], (1, N, H)), normal(k[2], (1, N, H, E))
    got = ops.gat_attention(u, w, v, masks.dense(adj[None, None]), implementation="reference")
    for i in range(N):
        nb = np.nonzero(np.asarray(adj[i]))[0]
        if len(nb) == 0:
            continue
        a = jax.nn.softmax(jax.nn.leaky_relu(u[0, i, 0] + w[0, nb, 0], 0.2))
        assert_close(got[0, i, 0], a @ v[0, nb, 0], 2e-5, f"node {i}")


@pytest.mark.slow
def test_gat_complete_graph_zero_a_is_mean():
    v = normal(_keys(1)[0], (2, 9, 3, 4))
    z = jnp.zeros((2, 9, 3))
    assert_close(
        ops.gat_attention(z, z, v), jnp.broadcast_to(v.mean(1, keepdims=True), v.shape), 2e-5, "mean"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gatv2_xla_matches_edge_list(dtype):
    N, H, P = 17, 2, 4
    adj, snd, rcv = _graph(N, 5)
    k = _keys(4, 5)
    ql, kr, v, a = (
        normal(k[0], (1, N, H, P)),
        normal(k[1], (1, N, H, P)),
        normal(k[2], (1, N, H, P)),
        normal(k[3], (H, P)),
    )
    fast = lambda ql, kr, v, a: ops.gatv2_attention(
        ql, kr, v, a, masks.dense(adj[None, None]), implementation="xla", block_sizes=BS
    )

    def ref(ql, kr, v, a):
        e = jnp.einsum("bmhp,hp->bmh", jax.nn.leaky_relu(ql[:, rcv] + kr[:, snd], 0.2), a)
        return ops.gat_edge_list(v, snd, rcv, e)

    loose = {f"grad[{i}]": 0.1 for i in range(4)} if dtype == jnp.bfloat16 else None  # LeakyReLU kink
    check_vjp(fast, ref, (ql, kr, v, a), dtype, what="gatv2", loose=loose)


# -- Set Transformer MAB core -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_mab_xla_matches_reference_and_scales_by_full_width(dtype):
    k = _keys(3, 6)
    q, kk, v = normal(k[0], (2, 5, 2, 4)), normal(k[1], (2, 11, 2, 4)), normal(k[2], (2, 11, 2, 4))
    lengths = jnp.array([11, 6])
    run = lambda impl: lambda q, k, v: ops.mab_attention(q, k, v, key_lengths=lengths, implementation=impl)
    check_vjp(run("xla"), run("reference"), (q, kk, v), dtype, what="mab")
    # explicitly: q + softmax(q k^T / sqrt(H E)) v over the valid keys
    s = jnp.einsum("thd,shd->hts", q[1], kk[1, :6]) / np.sqrt(8)
    want = q[1] + jnp.einsum("hts,she->the", jax.nn.softmax(s, -1), v[1, :6])
    assert_close(ops.mab_attention(q, kk, v, key_lengths=lengths)[1], want, 2e-5, "MAB formula")


def test_mab_bad_shapes():
    with pytest.raises(ValueError, match="head dim"):
        ops.mab_attention(jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 3, 2, 5)))


# -- BiDAF --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_bidaf_xla_matches_step_by_step(dtype):
    k = _keys(3, 7)
    h, u, w = normal(k[0], (2, 13, 5)), normal(k[1], (2, 7, 5)), normal(k[2], (15,))
    lens = dict(context_lengths=jnp.array([13, 9]), query_lengths=jnp.array([7, 4]))
    run = lambda impl: lambda h, u, w: ops.bidaf_attention(h, u, w, chunk=3, implementation=impl, **lens)
    check_vjp(run("xla"), run("reference"), (h, u, w), dtype, what="bidaf")


@pytest.mark.slow
def test_bidaf_one_query_word_by_hand():
    # J = 1: C2Q copies u_1; Q2C weights softmax_t(S_t1) with S_t1 = w.[h_t; u; h_t u]
    h, u = normal(_keys(1, 8)[0], (1, 4, 3)), jnp.array([[[1.0, -2.0, 0.5]]])
    w = jnp.arange(9.0) / 10
    g = ops.bidaf_attention(h, u, w, implementation="xla")[0]
    s = h[0] @ w[:3] + u[0, 0] @ w[3:6] + (h[0] * w[6:]) @ u[0, 0]
    h_tilde = jax.nn.softmax(s) @ h[0]
    want = jnp.concatenate([h[0], jnp.tile(u[0], (4, 1)), h[0] * u[0], h[0] * h_tilde], -1)
    assert_close(g, want, 2e-5, "BiDAF by hand")
    with pytest.raises(ValueError, match="w must have shape"):
        ops.bidaf_attention(h, u, jnp.zeros(8))


# -- reversed attention -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_reversed_xla_matches_dense(dtype):
    k = _keys(4, 9)
    q, kk, v = normal(k[0], (2, 11, 2, 4)), normal(k[1], (2, 11, 2, 4)), normal(k[2], (2, 11, 2, 3))
    m = jax.nn.sigmoid(normal(k[3], (2, 11, 2)))
    run = lambda impl: lambda q, k, v, m: ops.reversed_attention(q, k, v, m, implementation=impl)
    check_vjp(run("xla"), run("reference"), (q, kk, v, m), dtype, what="reversed")


@pytest.mark.slow
def test_reversed_children_send_m():
    # one-hot values per child: parent outputs summed over parents = each child's sent mass m_i
    N = 6
    q, kk = normal(_keys(2, 10)[0], (1, N, 1, 4)), normal(_keys(2, 10)[1], (1, N, 1, 4))
    m = jnp.linspace(0.1, 0.9, N).reshape(1, N, 1)
    out = ops.reversed_attention(q, kk, jnp.eye(N).reshape(1, N, 1, N), m, implementation="xla")
    assert_close(out[0, :, 0].sum(0), m[0, :, 0], 2e-5, "outgoing mass")


# -- adaptive attention with a visual sentinel --------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_sentinel_equals_appended_token(dtype):
    B, T, S, H, P, E = 2, 5, 9, 2, 4, 3
    k = _keys(6, 11)
    qf, kf, v = normal(k[0], (B, T, H, P)), normal(k[1], (B, S, H, P)), normal(k[2], (B, S, H, E))
    sf, s, w = normal(k[3], (B, T, H, P)), normal(k[4], (B, T, H, E)), normal(k[5], (H, P))
    fast = lambda *a: ops.sentinel_attention(*a, implementation="xla", block_sizes=BS)

    def appended(qf, kf, v, sf, s, w):  # one softmax over [regions; sentinel_t], per query
        z = jnp.einsum("btshp,hp->bths", jnp.tanh(qf[:, :, None] + kf[:, None]), w)
        zs = jnp.einsum("bthp,hp->bth", jnp.tanh(qf + sf), w)
        a = jax.nn.softmax(jnp.concatenate([z, zs[..., None]], -1), -1)
        out = jnp.einsum("bths,bshe->bthe", a[..., :S], v) + a[..., S:] * s
        return out, a[..., S]

    check_vjp(fast, appended, (qf, kf, v, sf, s, w), dtype, what="sentinel")


# -- dual cross-attention -----------------------------------------------------------------------


@pytest.mark.slow
def test_pwca_same_image_and_glca_all_tokens_equal_self_attention():
    q, kk, v = (normal(x, (2, 9, 2, 4)) for x in _keys(3, 12))
    sa = ops.attention(q, kk, v)
    assert_close(ops.pwca_attention(q, kk, v, kk, v), sa, 2e-5, "PWCA(I, I)")
    cls_row = normal(_keys(1, 13)[0], (2, 9))
    out, idx = ops.glca_attention(q, kk, v, cls_row, keep=8)
    assert sorted(np.asarray(idx[0]).tolist()) == list(range(9)) and int(idx[0, 0]) == 0
    assert_close(out, jnp.take_along_axis(sa, idx[:, :, None, None], 1), 2e-5, "GLCA(all)")
    with pytest.raises(ValueError, match="keep"):
        ops.glca_queries(cls_row, 9)


# -- attention pooling: efficient probing, gated MIL / ACMIL, label attention -------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_efficient_probe_matches_dense(dtype):
    k = _keys(3, 14)
    x, qs, vals = normal(k[0], (2, 11, 6)), normal(k[1], (3, 6)), normal(k[2], (2, 11, 9))
    lengths = jnp.array([11, 5])

    def dense(x, qs, vals):
        s = jnp.einsum("mc,bnc->bmn", qs, x) / np.sqrt(6)
        s = jnp.where(jnp.arange(11)[None, None] < lengths[:, None, None], s, -jnp.inf)
        a = jax.nn.softmax(s, -1)
        chunks = vals.reshape(2, 11, 3, 3)
        return jnp.einsum("bmn,bnmc->bmc", a, chunks).reshape(2, 9)

    fast = lambda x, qs, vals: ops.efficient_probe(x, qs, vals, lengths=lengths, implementation="xla")
    check_vjp(fast, dense, (x, qs, vals), dtype, what="efficient probe")
    with pytest.raises(ValueError, match="dividing"):
        ops.efficient_probe(x, qs, vals[..., :8])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_gated_mil_matches_dense_with_stkim(dtype):
    k = _keys(5, 15)
    h, vw, uw, w = normal(k[0], (2, 13, 5)), normal(k[1], (5, 4)), normal(k[2], (5, 4)), normal(k[3], (3, 4))
    keep = ops.stkim_keep(jnp.einsum("bnp,mp->bmn", ops.gated_mil_features(h, vw, uw), w), k[4], 4, 0.5)

    def fast(h, vw, uw, w):
        return ops.gated_mil_pooling(h, ops.gated_mil_features(h, vw, uw), w, keep=keep, implementation="xla")

    def dense(h, vw, uw, w):
        s = jnp.einsum("bnp,mp->bmn", ops.gated_mil_features(h, vw, uw), w)
        a = jax.nn.softmax(jnp.where(keep, s, -jnp.inf), -1)
        return jnp.einsum("bmn,bnc->bmc", a, h)

    check_vjp(fast, dense, (h, vw, uw, w), dtype, what="gated MIL")


@pytest.mark.slow
def test_stkim_and_mil_known_answers():
    scores = normal(_keys(1, 16)[0], (2, 3, 10))
    key = jax.random.key(0)
    assert ops.stkim_keep(scores, key, 4, 0.0).all()  # p = 0: the identity
    dropped = ~ops.stkim_keep(scores, key, 4, 1.0)
    assert (dropped.sum(-1) == 4).all()
    assert (jnp.where(dropped, scores, jnp.inf).min(-1) >= jnp.where(dropped, -jnp.inf, scores).max(-1)).all()
    h = normal(_keys(1, 17)[0], (2, 10, 3))
    z = ops.gated_mil_pooling(h, jnp.zeros((2, 10, 4)), jnp.ones((3, 4)), keep=~dropped)
    want = jnp.einsum("bmn,bnc->bmc", (~dropped) / (~dropped).sum(-1, keepdims=True), h)
    assert_close(z, want, 2e-5, "renormalized mean over kept instances")


def test_label_attention():
    k = _keys(3, 18)
    qs, kk, v = normal(k[0], (3, 4)), normal(k[1], (2, 7, 3, 4)), normal(k[2], (2, 7, 3, 5))
    out, a = ops.label_attention(qs, kk, v, lengths=jnp.array([7, 4]))
    assert_close(a.sum(-1), jnp.ones((2, 3)), 1e-6, "label weights sum to 1")
    assert not np.asarray(a[1, :, 4:]).any()
    assert_close(out, a.transpose(0, 2, 1)[..., None] * v, 1e-6, "a V per word")
    out, _ = ops.label_attention(jnp.zeros((3, 4)), kk, v)
    assert_close(out, v / 7, 1e-6, "uniform queries give V / N")


# -- lightweight and dynamic convolutions -------------------------------------------------------


@pytest.mark.parametrize(
    "causal", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["centered", "causal"]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_dynamic_conv_xla_matches_unfold(dtype, causal):
    k = _keys(2, 19)
    x, ker = normal(k[0], (2, 21, 6)), normal(k[1], (2, 21, 3, 4))
    run = lambda impl: (
        lambda x, ker: ops.dynamic_conv(x, ker, causal=causal, implementation=impl, block_sizes=BS)
    )
    check_vjp(run("xla"), run("reference"), (x, ker), dtype, what="dynamic conv")


@pytest.mark.parametrize("width", [pytest.param(4, marks=pytest.mark.slow), 5])
def test_lightweight_conv_is_depthwise_conv(width):
    k = _keys(2, 20)
    x, w = normal(k[0], (2, 13, 6)), normal(k[1], (3, width))
    sw = np.asarray(jax.nn.softmax(w, -1))
    xn, want = np.asarray(x), np.zeros((2, 13, 6))
    for c in range(6):
        for i in range(13):
            for j in range(1, width + 1):  # the paper's X_{i + j - ceil((k + 1) / 2)}
                t = i + j - -(-(width + 1) // 2)
                if 0 <= t < 13:
                    want[:, i, c] += sw[c // 2, j - 1] * xn[:, t, c]
    got = jax.jit(lambda x, w: ops.lightweight_conv(x, w, implementation="xla"))(x, w)
    assert_close(got, want, 2e-5, "LightConv == depthwise conv")
    # a constant predicted kernel is LightConv
    dyn = ops.dynamic_conv(x, jnp.broadcast_to(w, (2, 13, 3, width)), implementation="reference")
    assert_close(dyn, want, 2e-5, "DynamicConv(constant) == LightConv")


# -- latent alignments: hard attention, variational attention -----------------------------------


@pytest.mark.slow
def test_hard_attention_samples_average_to_soft_context():
    k = _keys(2, 21)
    logits, vals = normal(k[0], (3, 6)), normal(k[1], (3, 6, 4))
    keys = jax.random.split(jax.random.key(1), 4000)
    ctx, idx, lp = jax.vmap(lambda kk: ops.hard_attention(logits, vals, kk))(keys)
    soft = jnp.einsum("ns,nse->ne", jax.nn.softmax(logits, -1), vals)
    assert float(jnp.abs(ctx.mean(0) - soft).max()) < 0.1
    assert_close(
        lp,
        jnp.take_along_axis(jax.nn.log_softmax(logits, -1)[None].repeat(4000, 0), idx[..., None], -1)[..., 0],
        1e-6,
        "log_prob",
    )
    # the surrogate's gradient in expectation is the gradient of -E[reward]
    reward = vals[..., 0]  # reward of location s: vals[n, s, 0]

    def surrogate(lg):
        _, idx, lp = jax.vmap(lambda kk: ops.hard_attention(lg, vals, kk))(keys)
        return (
            ops.reinforce_surrogate(
                lp,
                jnp.take_along_axis(reward[None].repeat(4000, 0), idx[..., None], -1)[..., 0],
                baseline=reward.mean(-1),
            )
            * 3
        )

    exact = jax.grad(lambda lg: -(jax.nn.softmax(lg, -1) * reward).sum())(logits)
    assert float(jnp.abs(jax.grad(surrogate)(logits) - exact).max()) < 0.15


def test_doubly_stochastic_penalty():
    assert float(ops.doubly_stochastic_penalty(jnp.eye(4)[None])[0]) == 0.0
    a = jnp.full((1, 2, 3), 1 / 3)  # 2 steps, 3 locations: each gets 2/3
    assert_close(ops.doubly_stochastic_penalty(a, 0.5), jnp.array([0.5 * 3 / 9]), 1e-6, "penalty")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_alignment_marginal_blockwise_matches_enumeration(dtype):
    k = _keys(3, 22)
    q, kk, ll = normal(k[0], (2, 9, 2, 4)), normal(k[1], (2, 11, 2, 4)), -jnp.abs(normal(k[2], (2, 2, 9, 11)))

    def enum(q, kk, ll):
        s = jnp.einsum("bthd,bshd->bhts", q, kk) / 2.0
        return jax.nn.logsumexp(jax.nn.log_softmax(s, -1) + ll, -1).transpose(0, 2, 1)

    fast = lambda q, kk, ll: ops.alignment_marginal(q, kk, ll, implementation="xla")
    check_vjp(fast, enum, (q, kk, ll), dtype, what="marginal", tol=3e-2 if dtype == jnp.bfloat16 else None)


def test_kl_and_elbo():
    lp = jax.nn.log_softmax(normal(_keys(1, 23)[0], (4, 7)), -1)
    assert_close(ops.categorical_kl(lp, lp), jnp.zeros(4), 1e-6, "KL(p || p)")
    ll = -jnp.abs(normal(_keys(1, 24)[0], (4, 7)))
    post = jax.nn.log_softmax(lp + ll, -1)  # the true posterior: ELBO = marginal
    assert_close(ops.alignment_elbo(post, lp, ll), jax.nn.logsumexp(lp + ll, -1), 1e-5, "tight ELBO")
    assert (ops.alignment_elbo(lp, lp, ll) <= jax.nn.logsumexp(lp + ll, -1) + 1e-6).all()


# -- region masks -------------------------------------------------------------------------------


@pytest.mark.slow
def test_region_attention_permuted_equals_document_mask():
    q, kk, v = (normal(x, (2, 13, 2, 4)) for x in _keys(3, 25))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 3, (2, 13)))
    run = jax.jit(
        lambda q, k, v, p: ops.region_attention(q, k, v, ids, permute=p, implementation="xla"),
        static_argnums=3,
    )
    assert_close(run(q, kk, v, True), run(q, kk, v, False), 2e-5, "permuted == document")
    one = ops.region_attention(q, kk, v, jnp.zeros((2, 13), int))
    assert_close(one, ops.attention(q, kk, v), 2e-5, "one region is full attention")
    # MRSA: in-mask reference keys scaled by w, out-of-mask ones hidden
    flags = jnp.arange(13)[None].repeat(2, 0) >= 9
    mod = ops.reference_scaling(flags, 2.0)
    got = ops.attention(q, kk, v, score_mod=mod, implementation="xla")
    s = jnp.einsum("bthd,bshd->bhts", q, kk) / 2.0
    s = jnp.where(flags[:, None, None], 2.0 * s, s)
    assert_close(got, jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(s, -1), v), 2e-5, "MRSA scaling")


# -- coarse-to-fine -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_coarse_to_fine_xla_matches_hierarchical_weights(dtype):
    k = _keys(4, 26)
    q, kk, v = normal(k[0], (2, 7, 2, 4)), normal(k[1], (2, 15, 1, 4)), normal(k[2], (2, 15, 1, 3))
    coarse = jax.nn.softmax(normal(k[3], (2, 7, 2, 3)), -1)
    run = lambda impl: lambda *a: ops.coarse_to_fine_attention(*a, 5, implementation=impl)
    check_vjp(run("xla"), run("reference"), (q, kk, v, coarse), dtype, what="coarse-to-fine")


@pytest.mark.slow
def test_coarse_to_fine_known_answers():
    k = _keys(3, 27)
    q, kk, v = normal(k[0], (1, 5, 2, 4)), normal(k[1], (1, 12, 2, 4)), normal(k[2], (1, 12, 2, 3))
    one = ops.coarse_to_fine_attention(q, kk, v, jnp.ones((1, 5, 2, 1)), 12)
    assert_close(one, ops.attention(q, kk, v), 2e-5, "one cell is standard attention")
    # hierarchical weights sum to 1: constant values pass through
    coarse = ops.sparsemax(normal(k[0], (1, 5, 2, 4)))
    assert_close(coarse.sum(-1), jnp.ones((1, 5, 2)), 1e-6, "sparsemax on the simplex")
    ones = ops.coarse_to_fine_attention(q, kk, jnp.ones_like(v), coarse, 3, implementation="xla")
    assert_close(ones, jnp.ones_like(ones), 1e-5, "weights sum to 1")
    # hard selection of cell c == coarse weights one-hot on c
    cell = jnp.array([[0, 3, 1, 1, 2]])
    hard = ops.coarse_to_fine_hard(q, kk, v, cell, 3)
    onehot = jnp.broadcast_to(jax.nn.one_hot(cell, 4)[:, :, None], (1, 5, 2, 4))
    assert_close(hard, ops.coarse_to_fine_attention(q, kk, v, onehot, 3), 2e-5, "hard == one-hot")
    x = jnp.arange(16.0).reshape(1, 4, 4)
    assert ops.grid_cells(x, (2, 2))[0, :4].tolist() == [0.0, 1.0, 4.0, 5.0]
