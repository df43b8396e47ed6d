"""A tour of attnjax in one table: several attention variants, each checked against the dense
reference and timed.

    python -m experiments.demo          # about 30 s on a 2-core CPU
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from attnjax import masks, ops, score_mods

B, T, H, K, D = 2, 1024, 8, 2, 64


def variants(T: int):
    segments = jnp.repeat(jnp.arange(4), T // 4)[None].repeat(B, 0)
    return {
        "softmax, full": dict(),
        "softmax, causal": dict(mask=masks.causal()),
        "softmax, sliding window 128": dict(mask=masks.sliding_window(128)),
        "softmax, chunked 256 & causal": dict(mask=masks.chunked(256) & masks.causal()),
        "softmax, 4 documents & causal": dict(mask=masks.document(segments) & masks.causal()),
        "softmax, prefix-LM 200": dict(mask=masks.prefix_lm(200)),
        "softmax, causal + ALiBi": dict(mask=masks.causal(), score_mod=score_mods.alibi(score_mods.alibi_slopes(H))),
        "softmax, causal + softcap 20": dict(mask=masks.causal(), score_mod=score_mods.softcap(20.0)),
        "sigmoid, causal": dict(mask=masks.causal(), normalizer="sigmoid"),
        "relu, causal": dict(mask=masks.causal(), normalizer="relu"),
    }


def _time(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def main(T: int = T) -> list[dict]:
    """Prints the table; returns its rows."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, H, D))
    k = jax.random.normal(kk, (B, T, K, D))
    v = jax.random.normal(kv, (B, T, K, D))
    print(f"attnjax demo on {jax.devices()[0].platform}: q {q.shape}, k/v {k.shape} (grouped-query), float32\n")
    header = f"{'variant':34} {'output shape':>16} {'max |xla - ref|':>16} {'ref ms':>8} {'xla ms':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for name, kw in variants(T).items():
        ref_fn = jax.jit(lambda q, k, v, kw=kw: ops.attention(q, k, v, implementation="reference", **kw))
        xla_fn = jax.jit(lambda q, k, v, kw=kw: ops.attention(q, k, v, implementation="xla", **kw))
        ref, out = ref_fn(q, k, v), xla_fn(q, k, v)
        err = float(jnp.abs(out - ref).max())
        t_ref, t_xla = _time(ref_fn, q, k, v), _time(xla_fn, q, k, v)
        print(f"{name:34} {str(out.shape):>16} {err:16.2e} {1e3 * t_ref:8.1f} {1e3 * t_xla:8.1f}")
        rows.append(dict(variant=name, shape=out.shape, max_error=err, ref_seconds=t_ref, xla_seconds=t_xla))
    return rows


if __name__ == "__main__":
    main()
