"""Official conventions: each op's ``convention="official"`` (and the agent-bias resize) equals a
small numpy port of the released code's forward, written from the official repositories:
SkyworkAI/MoH (MoH-ViT ``attention_native.py``), facebookresearch/RAM (``projects/mta``),
rayleizhu/BiFormer (``ops/bra_legacy.py``), facebookresearch/mega (``MultiHeadEMA`` as released)
and LeapLabTHU/Agent-Attention (``F.interpolate(mode="bilinear")``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks, nn, ops
from attnjax.nn.agent import resize_bias

RNG = np.random.default_rng(0)
normal = lambda *shape: RNG.standard_normal(shape).astype(np.float32)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def dense_attention(q, k, v, scale, allowed=None):
    """``[B, T, H, D]`` softmax attention in numpy (float64)."""
    s = np.einsum("bthd,bshd->bhts", q, k).astype(np.float64) * scale
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    return np.einsum("bhts,bshd->bthd", softmax(s), v)


# --------------------------------------------------------------------------------------------
# MoH


def moh_official_gates(routed, shared, mix, top_k, hs):
    """MoH-ViT's gates on ``[tokens, .]`` logits (its ``forward``, routed/shared/mix branches)."""
    gates = softmax(routed.astype(np.float64))
    num_experts = gates.shape[1]
    indices = np.argsort(-gates, axis=1)[:, :top_k]
    mask = np.zeros_like(gates)
    np.put_along_axis(mask, indices, 1.0, axis=1)
    l_aux = np.mean(gates.mean(0) * mask.mean(0)) * num_experts * num_experts
    routed_gates = gates * mask
    routed_gates /= np.maximum(routed_gates.sum(1, keepdims=True), np.finfo(np.float32).eps)
    routed_gates *= top_k
    shared_gates = softmax(shared.astype(np.float64)) * hs if hs > 1 else np.ones((len(gates), hs)) * hs
    weight_0 = softmax(mix.astype(np.float64)) * 2
    shared_gates, routed_gates = shared_gates * weight_0[:, :1], routed_gates * weight_0[:, 1:]
    return np.concatenate([shared_gates, routed_gates], 1), l_aux


@pytest.mark.parametrize("hs", [1, 2])
def test_moh_official_equals_port(hs):
    B, T, H, D, top_k = 2, 6, 6, 4, 2
    q, k, v = normal(B, T, H, D), normal(B, T, H, D), normal(B, T, H, D)
    routed, shared, mix = normal(B, T, H - hs), normal(B, T, hs), normal(B, T, 2)
    res = ops.moh_attention(
        q,
        k,
        v,
        routed,
        top_k=top_k,
        shared_logits=shared,
        mix_logits=mix,
        convention="official",
        implementation="reference",
    )
    gates, aux = moh_official_gates(
        routed.reshape(B * T, -1), shared.reshape(B * T, -1), mix.reshape(B * T, 2), top_k, hs
    )
    heads = dense_attention(q, k, v, D**-0.5)
    want = heads * gates.reshape(B, T, H, 1)
    np.testing.assert_allclose(res.gates, gates.reshape(B, T, H), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.aux_loss, aux, rtol=1e-5)
    np.testing.assert_allclose(res.out, want, rtol=1e-4, atol=1e-5)
    paper = ops.moh_attention(
        q, k, v, routed, top_k=top_k, shared_logits=shared, mix_logits=mix, implementation="reference"
    )
    assert not np.allclose(paper.out, res.out, atol=1e-3)  # the two conventions differ
    # the module passes the convention on
    m = nn.MoHAttention(H, 12, num_shared_heads=hs, top_k=top_k, convention="official", rngs=nnx.Rngs(0))
    x = jnp.asarray(normal(B, T, 12))
    y, aux = m(x)
    r, s, mx = m.router_logits(x)
    want_y = m.out(
        ops.moh_attention(
            m.query(x),
            m.key(x),
            m.value(x),
            r,
            top_k=top_k,
            shared_logits=s,
            mix_logits=mx,
            convention="official",
        ).out
    )
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"convention must be one of \('paper', 'official'\); got 'torch'"):
        ops.moh_attention(q, k, v, routed, top_k=top_k, convention="torch")


# --------------------------------------------------------------------------------------------
# Multi-token attention


def mta_official(q, k, v, mta_kernel, head_kernel):
    """RAM ``projects/mta`` Attention.forward, pre-softmax q-k convolution (``pad_key="both"``),
    post-softmax head convolution, causal; ``[B, T, H, D]`` in and out."""
    B, T, H, D = q.shape
    cq, ck = mta_kernel.shape[1:]
    scores = np.einsum("bthd,bshd->bhts", q, k).astype(np.float64) / np.sqrt(D)
    causal = np.tril(np.ones((T, T), bool))
    scores = np.where(causal, scores, 0.0)
    padded = np.pad(scores, ((0, 0), (0, 0), (cq - 1, 0), ((ck - 1) // 2, (ck - 1) // 2)))
    conv = np.zeros_like(scores)
    for a in range(cq):  # F.conv2d, groups=H: a cross-correlation
        for b in range(ck):
            conv += mta_kernel[None, :, a, b, None, None] * padded[:, :, a : a + T, b : b + T]
    probs = softmax(np.where(causal, conv, -np.inf))
    G, ch = head_kernel.shape[:2]
    probs = probs.reshape(B, G, ch, T, T)
    mixed = np.stack([np.matmul(np.moveaxis(probs[:, i], 1, -1), head_kernel[i]) for i in range(G)], 1)
    probs = np.moveaxis(mixed, -1, 2).reshape(B, H, T, T)
    return np.einsum("bhts,bshd->bthd", probs, v)


def test_multi_token_official_equals_port():
    B, T, H, D = 2, 9, 4, 8
    q, k, v = normal(B, T, H, D), normal(B, T, H, D), normal(B, T, H, D)
    kernel, head_kernel = normal(H, 3, 5), normal(2, 2, 2)
    want = mta_official(q, k, v, kernel, head_kernel)
    for impl in ("reference", "xla"):
        got = ops.multi_token_attention(
            q,
            k,
            v,
            kernel=kernel,
            head_mix=head_kernel,
            mask=masks.causal(),
            convention="official",
            implementation=impl,
        )
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=impl)
    # the paper layout of the same weights: both kernel axes reversed, head mixing transposed
    paper = ops.multi_token_attention(
        q, k, v, kernel=kernel[:, ::-1, ::-1], head_mix=head_kernel.transpose(0, 2, 1), mask=masks.causal()
    )
    np.testing.assert_allclose(paper, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="c_k must be odd"):
        ops.multi_token_attention(q, k, v, kernel=normal(H, 3, 4), mask=masks.causal(), convention="official")


def test_multi_token_module_official_gating():
    """The official layer after attention: RMSNorm (eps 1e-5) per head, then the 1-D gate
    ``o * sigmoid(o w + b)``, then ``wo``; its identity initialization is plain attention."""
    B, T, H, C = 2, 7, 4, 16
    m = nn.MultiTokenAttention(H, C, kernel=(2, 3), output_gate="1d", convention="official", rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(m.kernel[...][:, -1, 1], 1.0)  # official identity: last query row
    m.kernel[...] = jnp.asarray(normal(H, 2, 3))
    m.head_mix[...] = jnp.asarray(normal(2, 2, 2))
    x = normal(B, T, C)
    proj = lambda lin: np.einsum("btc,chd->bthd", x, np.asarray(lin.kernel[...]))
    o = mta_official(
        proj(m.query), proj(m.key), proj(m.value), np.asarray(m.kernel[...]), np.asarray(m.head_mix[...])
    )
    o = o / np.sqrt((o**2).mean(-1, keepdims=True) + 1e-5) * np.asarray(m.norm.scale[...])
    gate = o @ np.asarray(m.gate.kernel[...]) + np.asarray(m.gate.bias[...])
    o = o / (1 + np.exp(-gate))
    want = np.einsum("bthd,hdc->btc", o, np.asarray(m.out.kernel[...]))
    np.testing.assert_allclose(m(jnp.asarray(x)), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# BiFormer


def biformer_official(x, w_qkv, b_qkv, n_win, heads, topk):
    """``BiLevelRoutingAttention.forward`` with ``auto_pad=True``, ``param_attention="qkv"``, no
    kv downsampling, no lepe (``side_dwconv=0``): ``x`` NHWC, ``w_qkv`` ``[C, 3C]``."""
    N, H_in, W_in, C = x.shape
    pad_b, pad_r = -H_in % n_win, -W_in % n_win
    x = np.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    _, Hp, Wp, _ = x.shape
    h, w = Hp // n_win, Wp // n_win
    x = x.reshape(N, n_win, h, n_win, w, C).transpose(0, 1, 3, 2, 4, 5).reshape(N, n_win * n_win, h * w, C)
    qkv = x @ w_qkv + b_qkv
    q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
    q_win, k_win = q.mean(2), k.mean(2)  # padded tokens count
    scale = C**-0.5  # qk_dim ** -0.5: the width of all heads
    r_idx = np.argsort(-(q_win * scale) @ k_win.transpose(0, 2, 1), axis=-1)[..., :topk]  # [N, p2, topk]
    p2 = n_win * n_win
    split = lambda t: t.reshape(*t.shape[:-1], heads, C // heads)
    out = np.zeros((N, p2, h * w, heads, C // heads))
    for b in range(N):
        for r in range(p2):
            ks = split(k[b, r_idx[b, r]].reshape(-1, C))
            vs = split(v[b, r_idx[b, r]].reshape(-1, C))
            qs = split(q[b, r])
            out[b, r] = dense_attention(qs[None], ks[None], vs[None], scale)[0]
    out = out.reshape(N, n_win, n_win, h, w, C).transpose(0, 1, 3, 2, 4, 5).reshape(N, Hp, Wp, C)
    return out[:, :H_in, :W_in]


@pytest.mark.parametrize("bias", [False, True])
def test_biformer_official_equals_port(bias):
    B, side, C, heads, n_win, topk = 2, 10, 16, 2, 3, 3
    x = normal(B, side, side, C)
    w_qkv, b_qkv = normal(C, 3 * C) / np.sqrt(C), normal(3 * C) * bias
    want = biformer_official(x, w_qkv, b_qkv, n_win, heads, topk)
    region = -(-side // n_win)
    heads_of = lambda t: jnp.asarray(t.reshape(*t.shape[:-1], heads, C // heads))
    if not bias:  # padding after the projection is padding before it
        qkv = x @ w_qkv
        q, k, v = (heads_of(qkv[..., i * C : (i + 1) * C]) for i in range(3))
        got = ops.biformer_attention(q, k, v, region_size=region, top_k=topk, convention="official")
    else:  # the official code pads x, then projects: do the same, then call on whole regions
        pad = -side % region
        xp = np.pad(x, ((0, 0), (0, pad), (0, pad), (0, 0)))
        qkv = xp @ w_qkv + b_qkv
        q, k, v = (heads_of(qkv[..., i * C : (i + 1) * C]) for i in range(3))
        got = ops.biformer_attention(q, k, v, region_size=region, top_k=topk, convention="official")
        got = got[:, :side, :side]
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-4)
    paper = ops.biformer_attention(q, k, v, region_size=region, top_k=topk)
    assert not np.allclose(paper[:, :side, :side], got, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Mega


def mega_ema_official(x, alpha, delta, beta, gamma, omega):
    """``MultiHeadEMA.forward`` as released (``p = sigmoid(delta)``, ``q = 1 - p *
    sigmoid(alpha)``), unidirectional, ``[B, T, C]`` (the official layout is ``[T, B, C]``)."""
    sig = lambda t: 1 / (1 + np.exp(-t))
    p = sig(delta.astype(np.float64))
    q = 1.0 - p * sig(alpha.astype(np.float64))
    N, T = alpha.shape[1], x.shape[1]
    vander = np.exp(np.arange(T)[None, None] * np.log(q))  # [C, N, T]
    kernel = np.einsum("dnl,dn->dl", p * beta * vander, gamma * np.sqrt(1.0 / N))
    out = np.stack([np.einsum("btc,ct->bc", x[:, : t + 1][:, ::-1], kernel[:, : t + 1]) for t in range(T)], 1)
    out = out + x * omega
    return out / (1 + np.exp(-out))  # silu


def test_mega_official_names_equal_port():
    B, T, C, N = 2, 11, 3, 4
    x = normal(B, T, C)
    alpha, delta, beta, gamma, omega = (
        normal(C, N, 1),
        normal(C, N, 1),
        normal(C, N, 1),
        normal(C, N),
        normal(C),
    )
    want = mega_ema_official(x, alpha, delta, beta, gamma, omega)
    sig = jax.nn.sigmoid
    for impl in ("reference", "xla"):
        ema = ops.damped_ema(
            x,
            sig(alpha[..., 0]),
            sig(delta[..., 0]),
            beta[..., 0],
            gamma * np.sqrt(1 / N),
            convention="official",
            implementation=impl,
        )
        np.testing.assert_allclose(jax.nn.silu(ema + x * omega), want, rtol=1e-4, atol=1e-5, err_msg=impl)
    paper = ops.damped_ema(x, sig(delta[..., 0]), sig(alpha[..., 0]), beta[..., 0], gamma * np.sqrt(1 / N))
    np.testing.assert_allclose(jax.nn.silu(paper + x * omega), want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Agent attention: the position-bias resize


def torch_bilinear(x, size):
    """``F.interpolate(x, size, mode="bilinear" / "linear", align_corners=False)`` on the
    trailing axes, as ATen computes it: source ``(i + 0.5) * in / out - 0.5`` clamped at 0,
    linear between its floor and the next pixel (clamped at the edge), no antialiasing."""
    for axis, out in zip(range(x.ndim - len(size), x.ndim), size):
        n = x.shape[axis]
        src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n - 1)
        i1 = np.minimum(i0 + 1, n - 1)
        lam = (src - i0).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        x = np.take(x, i0, axis) * (1 - lam) + np.take(x, i1, axis) * lam
    return x


@pytest.mark.parametrize("size", [(7, 7), (14, 10), (4, 4), (3, 5), (2, 9), (1, 1)])
def test_agent_bias_resize_matches_official(size):
    table = normal(2, 3, 7, 7)
    np.testing.assert_allclose(
        resize_bias(jnp.asarray(table), size), torch_bilinear(table, size), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("size", [(7, 7), (4, 4), (14, 10), (3, 5)])
def test_agent_bias_resize_matches_torch(size):
    torch = pytest.importorskip("torch")
    table = normal(2, 3, 7, 7)
    want = torch.nn.functional.interpolate(torch.from_numpy(table), size=size, mode="bilinear").numpy()
    np.testing.assert_allclose(resize_bias(jnp.asarray(table), size), want, rtol=1e-5, atol=1e-6)


def test_agent_module_uses_the_official_resize():
    m = nn.AgentAttention(2, 8, agents=(2, 2), bias_size=7, rngs=nnx.Rngs(0))
    agent_bias, query_bias = m.biases((4, 5))  # a grid smaller than the table
    want = torch_bilinear(np.asarray(m.agent_bias_table[...]), (4, 5)).reshape(2, 4, 20)
    np.testing.assert_allclose(agent_bias[0], want, rtol=1e-5, atol=1e-6)
    want = torch_bilinear(np.asarray(m.query_bias_table[...]), (4, 5)).reshape(2, 4, 20).transpose(0, 2, 1)
    np.testing.assert_allclose(query_bias[0], want, rtol=1e-5, atol=1e-6)
