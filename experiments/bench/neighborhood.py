"""Neighborhood attention: cost follows the window, not the sequence.

    python -m experiments.bench.cpu neighborhood           # 2-D 64x64, 1-D 16K, k = 7..65; ~10 min, 2 cores
    python -m experiments.bench.cpu neighborhood --quick   # 2-D 32x32 and 1-D 2K: a smoke test
    python -m experiments.bench.gpu neighborhood           # Pallas NA vs cuDNN dense, NATTEN profiler configs

CPU: forward pass, float32, B=1, D=64 (H=4 in 2-D, H=1 in 1-D so the dense 16K x 16K reference fits
in memory), each (implementation, config) in a fresh process. Implementations:

* ``na_xla``: ``ops.neighborhood_attention(..., implementation="xla")`` (query tiles x key halos);
* ``dense_reference``: ``ops.attention(..., mask=masks.neighborhood(...), implementation="reference")``;
* ``generic_xla``: ``ops.attention(..., mask=masks.neighborhood(...), implementation="xla")``
  (the blockwise path on the flattened sequence, skipping tiles the block map calls empty).

GPU: ``ops.neighborhood_attention(..., implementation="pallas")`` against
``jax.nn.dot_product_attention(implementation="cudnn")`` on the same tokens, bf16, B=1, H=8 (1-D) or 4
(2-D), D=128, reported as speed-up next to the bound ``1 / density``.

Writes ``benchmarks/results/neighborhood-<backend>-<date>.json``.
"""

from __future__ import annotations

import json
import math
import sys

from . import common

CPU_IMPLEMENTATIONS = ("na_xla", "dense_reference", "generic_xla")
D = 64


def _configs(quick: bool):
    """(name, spatial, kernel, heads)."""
    if quick:
        return [("2d", (32, 32), 7, 4), ("1d", (2048,), 65, 1)]
    out = [("2d", (64, 64), k, 4) for k in (7, 15, 31)]
    out += [("1d", (16384,), k, 1) for k in (7, 17, 33, 65)]
    return out


def _inputs(spatial, heads, dtype="float32", head_dim=D):
    import jax
    import jax.numpy as jnp

    shape = (1, *spatial, heads, head_dim)
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(key, shape, jnp.dtype(dtype)) for key in keys)


def _fn(impl: str, spatial, kernel, stride=1):
    import jax

    from attnjax import masks, ops

    if impl in ("na_xla", "na_pallas"):
        which = impl.split("_")[1]
        return jax.jit(lambda q, k, v: ops.neighborhood_attention(
            q, k, v, kernel_size=kernel, stride=stride, implementation=which))
    flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[-2:])
    if impl == "cudnn_dense":
        return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            flat(q), flat(k), flat(v), implementation="cudnn"))
    mask = masks.neighborhood(spatial, kernel, stride=stride)
    which = {"dense_reference": "reference", "generic_xla": "xla"}[impl]
    return jax.jit(lambda q, k, v: ops.attention(flat(q), flat(k), flat(v), mask=mask, implementation=which))


def worker(impl: str, spatial: str, kernel: str, heads: str, stride: str = "1", dtype: str = "float32",
           head_dim: str = str(D)) -> None:
    import jax

    spatial_t = tuple(int(x) for x in spatial.split("x"))
    q, k, v = _inputs(spatial_t, int(heads), dtype, int(head_dim))
    jax.block_until_ready((q, k, v))
    base = common.peak_rss_bytes()
    seconds = common.time_fn(_fn(impl, spatial_t, int(kernel), int(stride)), q, k, v, repeats=3)
    print(json.dumps({"seconds": seconds, "peak_extra_bytes": common.peak_rss_bytes() - base}))


def cpu(args) -> None:
    rows = []
    for name, spatial, kernel, heads in _configs(args.quick):
        for impl in CPU_IMPLEMENTATIONS:
            sp = "x".join(map(str, spatial))
            row = {"config": name, "spatial": sp, "kernel": kernel, "heads": heads, "implementation": impl,
                   **common.run_worker(__name__, impl, sp, str(kernel), str(heads))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    by = {(r["spatial"], r["kernel"], r["implementation"]): r for r in rows}
    for name, spatial, kernel, heads in _configs(args.quick):
        sp = "x".join(map(str, spatial))
        na, ref, gen = (by[(sp, kernel, i)] for i in CPU_IMPLEMENTATIONS)
        if "seconds" not in na:
            continue
        entry = {"density": round(kernel ** len(spatial) / math.prod(spatial), 5)}
        if "seconds" in ref:
            entry["na_xla_speedup_over_dense_reference"] = round(ref["seconds"] / na["seconds"], 2)
        if "seconds" in gen:
            entry["na_xla_speedup_over_generic_xla"] = round(gen["seconds"] / na["seconds"], 2)
        summary[f"{sp} k={kernel}"] = entry
    config = {"B": 1, "D": D, "dtype": "float32", "pass": "forward"}
    payload = {"config": config, "rows": rows, "summary": summary}
    common.save("neighborhood", payload, args)


# NATTEN profiler configs: (name, spatial, kernel, stride, heads)
GPU_CONFIGS = [
    ("1d-32K-w2K-s1", (32768,), 2048, 1, 8),
    ("1d-32K-w2K-s256", (32768,), 2048, 256, 8),
    ("2d-256x256-w80-s16", (256, 256), 80, 16, 4),
]
DRY_RUN_CONFIGS = [("2d-16x16-w5-s1", (16, 16), 5, 1, 2)]
"""``--dry-run`` / ``--quick``: tiny, so interpret mode on CPU finishes in seconds."""


def gpu_payload(args) -> dict:
    """Pallas NA vs cuDNN dense: the GPU suite's measurements (correctness checks first, then
    timings); ``--quick`` runs one tiny configuration (also on CPU, interpret mode)."""
    rows, summary = [], {}
    configs = DRY_RUN_CONFIGS if args.quick else GPU_CONFIGS
    head_dim = "32" if args.quick else "128"
    for name, spatial, kernel, stride, heads in configs:
        sp = "x".join(map(str, spatial))
        result = {}
        for impl in ("na_pallas", "cudnn_dense"):
            row = {"config": name, "implementation": impl,
                   **common.run_worker(__name__, impl, sp, str(kernel), str(heads), str(stride),
                                       "bfloat16", head_dim)}
            rows.append(row)
            result[impl] = row
            print(json.dumps(row), flush=True)
        density = _density(spatial, kernel, stride)
        entry = {"density": round(density, 5), "bound_1_over_density": round(1 / density, 2)}
        if all("seconds" in r for r in result.values()):
            speedup = result["cudnn_dense"]["seconds"] / result["na_pallas"]["seconds"]
            entry["speedup_over_cudnn_dense"] = round(speedup, 2)
            entry["fraction_of_bound"] = round(speedup * density, 3)
        summary[name] = entry
    config = {"B": 1, "D": int(head_dim), "dtype": "bfloat16", "pass": "forward"}
    payload = {"config": config, "rows": rows, "summary": summary}
    return payload


def gpu(args) -> None:
    common.save("neighborhood", gpu_payload(args), args)


def _density(spatial, kernel, stride) -> float:
    """Fraction of the dense score matrix that neighborhood attention computes: every
    non-causal query sees exactly ``kernel`` keys per axis (windows are clamped), whatever the stride."""
    return math.prod(kernel / n for n in spatial)



if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(*sys.argv[2:])
