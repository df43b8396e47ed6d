"""Gated and structured variants: the efficient path against the dense one, per variant.

    python -m experiments.bench.cpu gated_variants           # 2 sizes per variant; ~3-4 min, 2 cores
    python -m experiments.bench.cpu gated_variants --quick   # smallest sizes: a smoke test
    python -m experiments.bench.gpu gated_variants           # larger sizes (not yet run on a GPU)

Forward pass, float32, B=1, each (variant, implementation, size) in a fresh process
(``common.run_worker``). Variants and what is compared:

* ``mega``: :func:`ops.mega_attention` causal, one head, D=E=64: ``chunk_xla`` (Mega-chunk, chunks
  of 128, blockwise path skipping the tiles outside the chunks) vs ``full_xla`` (full causal
  attention, blockwise) vs ``full_reference`` (dense ``[T, T]``);
* ``mega_ema``: :func:`ops.damped_ema`, C=64 channels, N=16: ``fft`` vs ``scan`` (the recurrence);
* ``maxvit``: :func:`ops.block_attention` (window 8x8) and :func:`ops.grid_attention` (grid 8x8)
  on an ``s x s`` grid, H=2, D=32: ``*_xla`` (groups as a batch) vs ``*_dense`` (dense attention
  over the flattened grid with the equivalent mask);
* ``l2vit``: global attention over an ``s x s`` grid, H=2, D=32: ``linear_xla``
  (:func:`ops.linear_attention`, ReLU features, as in L2ViT) vs ``softmax_xla`` / ``softmax_reference``
  (:func:`ops.attention` without mask).

Writes ``benchmarks/results/gated_variants-<backend>-<date>.json``.
"""

from __future__ import annotations

import json
import sys

from . import common

VARIANTS = {
    "mega": ("chunk_xla", "full_xla", "full_reference"),
    "mega_ema": ("fft", "scan"),
    "maxvit": ("block_xla", "block_dense", "grid_xla", "grid_dense"),
    "l2vit": ("linear_xla", "softmax_xla", "softmax_reference"),
}
# (variant, size): sequence length for mega/mega_ema, grid side for maxvit/l2vit.
SIZES = {"mega": (1024, 4096), "mega_ema": (4096, 16384), "maxvit": (32, 64), "l2vit": (32, 64)}
GPU_SIZES = {"mega": (4096, 16384), "mega_ema": (16384, 65536), "maxvit": (64, 128), "l2vit": (64, 128)}
QUICK = {"mega": (512,), "mega_ema": (1024,), "maxvit": (16,), "l2vit": (16,)}


def _fn_and_inputs(variant: str, impl: str, size: int):
    import jax

    from attnjax import ops

    keys = jax.random.split(jax.random.key(0), 6)
    normal = lambda key, shape: jax.random.normal(key, shape)
    if variant == "mega":
        q, k, v = (normal(kk, (1, size, 1, 64)) for kk in keys[:3])
        chunk = 128 if impl == "chunk_xla" else None
        which = "reference" if impl == "full_reference" else "xla"
        return jax.jit(lambda q, k, v: ops.mega_attention(q, k, v, chunk_size=chunk, implementation=which)), (q, k, v)
    if variant == "mega_ema":
        x = normal(keys[0], (1, size, 64))
        a, d, b, e = jax.random.uniform(keys[1], (4, 64, 16), minval=0.05, maxval=0.95)
        which = "xla" if impl == "fft" else "reference"
        return jax.jit(lambda *args: ops.damped_ema(*args, implementation=which)), (x, a, d, b, e)
    q, k, v = (normal(kk, (1, size, size, 2, 32)) for kk in keys[:3])
    if variant == "maxvit":
        axis, how = impl.split("_")
        which = "xla" if how == "xla" else "reference"
        if axis == "block":
            fn = lambda q, k, v: ops.block_attention(q, k, v, window=8, implementation=which)
        else:
            fn = lambda q, k, v: ops.grid_attention(q, k, v, grid=8, implementation=which)
        return jax.jit(fn), (q, k, v)
    flat = lambda x: x.reshape(1, size * size, 2, 32)
    if impl == "linear_xla":
        fn = lambda q, k, v: ops.linear_attention(flat(q), flat(k), flat(v), feature_map="relu", implementation="xla")
    else:
        which = impl.split("_")[1]
        fn = lambda q, k, v: ops.attention(flat(q), flat(k), flat(v), implementation=which)
    return jax.jit(fn), (q, k, v)


def worker(variant: str, impl: str, size: str) -> None:
    import jax

    fn, args = _fn_and_inputs(variant, impl, int(size))
    jax.block_until_ready(args)
    base = common.peak_rss_bytes()
    seconds = common.time_fn(fn, *args, repeats=3)
    print(json.dumps({"seconds": seconds, "peak_extra_bytes": common.peak_rss_bytes() - base}))


def _summary(rows) -> dict:
    by = {(r["variant"], r["implementation"], r["size"]): r.get("seconds") for r in rows}
    ratio = lambda a, b: round(a / b, 2) if a and b else None
    out = {}
    for (variant, impl, size), seconds in sorted(by.items()):
        if variant == "mega" and impl == "chunk_xla":
            out[f"mega T={size}"] = {"chunk_speedup_over_full_xla": ratio(by[(variant, "full_xla", size)], seconds),
                                     "chunk_speedup_over_full_reference":
                                         ratio(by[(variant, "full_reference", size)], seconds)}
        elif variant == "mega_ema" and impl == "fft":
            out[f"mega_ema T={size}"] = {"fft_speedup_over_scan": ratio(by[(variant, "scan", size)], seconds)}
        elif variant == "maxvit" and impl.endswith("_xla"):
            axis = impl.split("_")[0]
            out[f"maxvit {axis} {size}x{size}"] = {
                "speedup_over_dense_masked": ratio(by[(variant, f"{axis}_dense", size)], seconds)}
        elif variant == "l2vit" and impl == "linear_xla":
            out[f"l2vit {size}x{size}"] = {
                "linear_speedup_over_softmax_xla": ratio(by[(variant, "softmax_xla", size)], seconds),
                "linear_speedup_over_softmax_reference": ratio(by[(variant, "softmax_reference", size)], seconds)}
    return out


def cpu(args) -> None:
    _run(args, QUICK if args.quick else SIZES)


def gpu(args) -> None:
    """The same comparisons at 4x the CPU sizes (written for a GPU session; not yet run on one)."""
    _run(args, QUICK if args.quick else GPU_SIZES)


def _run(args, sizes) -> None:
    rows = []
    for variant, impls in VARIANTS.items():
        for size in sizes[variant]:
            for impl in impls:
                row = {"variant": variant, "implementation": impl, "size": size,
                       **common.run_worker(__name__, variant, impl, str(size))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    config = {"B": 1, "dtype": "float32", "pass": "forward",
              "mega": "H=1, D=E=64, causal, chunk 128", "mega_ema": "C=64, N=16",
              "maxvit": "H=2, D=32, window 8x8, grid 8x8", "l2vit": "H=2, D=32, ReLU features"}
    common.save("gated_variants", {"config": config, "rows": rows, "summary": _summary(rows)}, args)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(*sys.argv[2:])
