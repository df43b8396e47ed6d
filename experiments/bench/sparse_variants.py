"""Routed and sparse variants: the gathered/skipping path against the same computation done
densely, as the sequence grows.

    python -m experiments.bench.cpu sparse_variants           # T = 1K, 2K, 4K; took 13 min on the shared
                                                              # 2-core machine under load ~10
    python -m experiments.bench.cpu sparse_variants --quick   # T = 256, 512: a smoke test

CPU, forward pass, float32, B=1, H=2, D=E=64. Per variant, each implementation runs in a fresh
process over all lengths (``implementation="xla"``: the efficient path; ``"reference"``: the
dense one, which materializes ``[T, S]``). Settings keep each query's key budget fixed, so the
efficient path should grow about linearly in T and the dense one quadratically:

* ``biformer``: 1-D regions of 64 tokens, top-4 regions;
* ``routing``: causal, clusters of 64 (``C = T / 64`` centroids);
* ``moa``: spans ``64 + 0 * T`` and ``32 + T / 32``, 16 sink tokens (per-span blockwise calls);
* ``hyper`` / ``hyper_causal``: blocks of 64 keys, 64 sampled columns;
* ``landmark``: decoding-like, the last 64 queries over ``S = T`` keys (landmark retrieval's use:
  gathering copies ``(1 + top_k) * 64`` keys per query, which pays only when ``S`` is longer),
  blocks of 64, top-4 retrieved blocks.

Writes ``benchmarks/results/sparse_variants-<backend>-<date>.json``.
"""

from __future__ import annotations

import json
import sys

from . import common

VARIANTS = ("biformer", "routing", "moa", "hyper", "hyper_causal", "landmark")
H, D = 2, 64


def _lengths(quick: bool):
    return (256, 512) if quick else (1024, 2048, 4096)


def _fn(variant: str, impl: str, T: int):
    import jax

    from attnjax import ops

    if variant == "biformer":
        op = lambda q, k, v: ops.biformer_attention(q, k, v, region_size=64, top_k=4, implementation=impl)
    elif variant == "routing":
        mu = ops.routing_init(jax.random.key(1), H, T // 64, D)
        op = lambda q, k, v: ops.routing_attention(q, k, v, mu, is_causal=True, implementation=impl)
    elif variant == "moa":
        op = lambda q, k, v: ops.moa_attention(q, k, v, alpha=(64, 32), beta=(0.0, 1 / 32), sinks=16,
                                               implementation=impl)
    elif variant in ("hyper", "hyper_causal"):
        op = lambda q, k, v: ops.hyper_attention(q, k, v, key=jax.random.key(2), bucket_size=64, sample_size=64,
                                                 is_causal=variant == "hyper_causal", implementation=impl)
    elif variant == "landmark":
        marks = jax.random.normal(jax.random.key(3), (1, T // 64, H, D))
        op = lambda q, k, v: ops.landmark_attention(q[:, -64:], k, v, marks, block_len=64, top_k=4,
                                                    implementation=impl)
    else:
        raise ValueError(variant)
    return jax.jit(op)


def worker(variant: str, impl: str, lengths: str) -> None:
    import jax

    rows = []
    for T in (int(t) for t in lengths.split(",")):
        q, k, v = (jax.random.normal(key, (1, T, H, D)) for key in jax.random.split(jax.random.key(0), 3))
        rows.append({"T": T, "seconds": common.time_fn(_fn(variant, impl, T), q, k, v, repeats=3)})
    print(json.dumps({"rows": rows}))


def cpu(args) -> None:
    lengths = _lengths(args.quick)
    rows = []
    for variant in VARIANTS:
        for impl in ("xla", "reference"):
            result = common.run_worker(__name__, variant, impl, ",".join(map(str, lengths)))
            for r in result.get("rows", [{"error": result.get("error")}]):
                row = {"variant": variant, "implementation": impl, **r}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    by = {(r["variant"], r["implementation"], r.get("T")): r for r in rows}
    for variant in VARIANTS:
        entry = {}
        for T in lengths:
            eff, ref = by.get((variant, "xla", T), {}), by.get((variant, "reference", T), {})
            if "seconds" in eff and "seconds" in ref:
                entry[f"T={T}"] = {"xla_ms": round(1e3 * eff["seconds"], 2), "reference_ms": round(1e3 * ref["seconds"], 2),
                                   "speedup": round(ref["seconds"] / eff["seconds"], 2)}
        t0, t1 = (by.get((variant, i, lengths[-1]), {}) for i in ("xla", "reference"))
        s0, s1 = (by.get((variant, i, lengths[0]), {}) for i in ("xla", "reference"))
        if all("seconds" in r for r in (t0, t1, s0, s1)):
            growth = lengths[-1] // lengths[0]
            entry[f"growth_over_{growth}x_length"] = {"xla": round(t0["seconds"] / s0["seconds"], 2),
                                                      "reference": round(t1["seconds"] / s1["seconds"], 2)}
        summary[variant] = entry
    config = {"B": 1, "H": H, "D": D, "dtype": "float32", "pass": "forward"}
    common.save("sparse_variants", {"config": config, "rows": rows, "summary": summary}, args)


def gpu(args) -> None:
    """Not written yet: the variants have no Pallas kernels; the CPU comparison is the claim."""
    raise SystemExit("sparse_variants has no GPU benchmark yet (no Pallas kernels for these variants)")


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(*sys.argv[2:])
