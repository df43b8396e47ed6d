"""Causal softmax attention on CPU: attnjax reference vs xla vs ``jax.nn.dot_product_attention``.

    python -m experiments.bench.cpu attention           # T = 1K..16K, about 5 minutes on 2 cores
    python -m experiments.bench.cpu attention --quick   # T = 256, 512: a smoke test

B=1, H=4, D=64, float32, forward pass. Each (implementation, length) runs in a fresh process
so its peak memory (resident set above the inputs) is its own. Writes
``benchmarks/results/attention-cpu-<date>.json``.
"""

from __future__ import annotations

import json
import sys

from . import common

IMPLEMENTATIONS = ("reference", "xla", "jax.nn")
B, H, D = 1, 4, 64


def _fn(impl: str):
    import jax

    from attnjax import masks, ops

    if impl == "jax.nn":
        return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    return jax.jit(lambda q, k, v: ops.attention(q, k, v, mask=masks.causal(), implementation=impl))


def worker(impl: str, length: str) -> None:
    import jax

    T = int(length)
    q, k, v = (jax.random.normal(key, (B, T, H, D)) for key in jax.random.split(jax.random.key(0), 3))
    jax.block_until_ready((q, k, v))
    base = common.peak_rss_bytes()
    seconds = common.time_fn(_fn(impl), q, k, v, repeats=3)
    print(json.dumps({"seconds": seconds, "peak_extra_bytes": common.peak_rss_bytes() - base}))


def cpu(args) -> None:
    lengths = (256, 512) if args.quick else (1024, 2048, 4096, 8192, 16384)
    rows = []
    for T in lengths:
        for impl in IMPLEMENTATIONS:
            row = {"T": T, "implementation": impl, **common.run_worker(__name__, impl, str(T))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    by = {(r["T"], r["implementation"]): r for r in rows}
    summary = {}
    for T in lengths:
        ref, xla = by[(T, "reference")], by[(T, "xla")]
        if "seconds" in ref and "seconds" in xla:
            summary[T] = {
                "xla_speedup_over_reference": round(ref["seconds"] / xla["seconds"], 2),
                "xla_memory_fraction_of_reference": round(xla["peak_extra_bytes"] / max(ref["peak_extra_bytes"], 1), 4),
            }
            if "seconds" in by[(T, "jax.nn")]:
                summary[T]["xla_speedup_over_jax_nn"] = round(by[(T, "jax.nn")]["seconds"] / xla["seconds"], 2)
    payload = {"config": {"B": B, "H": H, "D": D, "dtype": "float32", "mask": "causal", "pass": "forward"},
               "rows": rows, "summary": summary}
    common.save("attention", payload, args)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(*sys.argv[2:])
