"""Zoo part 1 vision variants: each efficient path against its dense reference at growing image
sizes (the point is the growth: the dense paths grow with the square of the pixels).

    python -m experiments.bench.cpu vision_variants           # 2 sizes per variant; ~4 min, 2 cores
    python -m experiments.bench.cpu vision_variants --quick   # smallest sizes: a smoke test

Forward pass, float32, B=1, each (variant, implementation, size) in a fresh process
(``common.run_worker``), on an ``s x s`` grid:

* ``deformable``: :func:`ops.deformable_attention`, two levels (``s x s``, ``s/2 x s/2``), 256
  queries, M=4 heads, K=4 points, E=16: ``gather`` (four corners per point) vs ``dense`` (the
  sparse-as-dense ``[T, sum h w]`` matrix);
* ``halo``: :func:`ops.halo_attention`, block 4, halo 2, H=2, D=32, with relative tables:
  ``windows`` (unfolded, batched) vs ``dense`` (halo mask over the padded grid);
* ``vsa``: :func:`ops.sampled_window_attention`, window 8, H=2, D=32: ``gather`` vs ``dense``
  (dense bilinear matrix + dense attention);
* ``vwa``: :func:`ops.varying_window_attention`, window 4, ratio 3: ``box`` (box filter + gather)
  vs ``unfold`` (every context window unfolded and pooled);
* ``catanet``: :func:`ops.token_aggregation_attention`, groups of 64, H=2, D=32: ``groups`` vs
  ``dense`` (group mask over the sorted sequence);
* ``area``: :func:`ops.area_attention`, 4 areas, H=2, D=32: ``segments`` vs ``dense`` (chunked
  mask).

Writes ``benchmarks/results/vision_variants-<backend>-<date>.json``.
"""

from __future__ import annotations

import json
import sys

from experiments.bench import common

VARIANTS = {
    "deformable": ("gather", "dense"),
    "halo": ("windows", "dense"),
    "vsa": ("gather", "dense"),
    "vwa": ("box", "unfold"),
    "catanet": ("groups", "dense"),
    "area": ("segments", "dense"),
}
EFFICIENT = {
    "deformable": "gather",
    "halo": "windows",
    "vsa": "gather",
    "vwa": "box",
    "catanet": "groups",
    "area": "segments",
}
SIZES = (32, 64)
QUICK = (16,)


def _fn_and_inputs(variant: str, impl: str, s: int):
    import jax
    import jax.numpy as jnp

    from attnjax import ops

    which = "xla" if impl == EFFICIENT[variant] else "reference"
    keys = jax.random.split(jax.random.key(0), 6)
    normal = lambda key, shape: jax.random.normal(key, shape)
    if variant == "deformable":
        shapes = [(s, s), (s // 2, s // 2)]
        values = normal(keys[0], (1, s * s + (s // 2) ** 2, 4, 16))
        loc = jax.random.uniform(keys[1], (1, 256, 4, 2, 4, 2))
        logits = normal(keys[2], (1, 256, 4, 2, 4))
        fn = lambda v, l, a: ops.deformable_attention(v, shapes, l, a, implementation=which)
        return jax.jit(fn), (values, loc, logits)
    q, k, v = (normal(kk, (1, s, s, 2, 32)) for kk in keys[:3])
    if variant == "halo":
        r = 0.1 * normal(keys[3], (2, 2 * 8 - 1, 32))
        fn = lambda q, k, v, r: ops.halo_attention(
            q, k, v, block=4, halo=2, rel_row=r[0], rel_col=r[1], implementation=which
        )
        return jax.jit(fn), (q, k, v, r)
    if variant == "vsa":
        so = 0.1 * normal(keys[3], (2, 1, s // 8, s // 8, 2, 2))
        fn = lambda q, k, v, so: ops.sampled_window_attention(
            q, k, v, so[0], so[1], window=8, implementation=which
        )
        return jax.jit(fn), (q, k, v, so)
    if variant == "vwa":
        fn = lambda q, k, v: ops.varying_window_attention(q, k, v, window=4, ratio=3, implementation=which)
        return jax.jit(fn), (q, k, v)
    flat = lambda x: x.reshape(1, s * s, 2, 32)
    if variant == "catanet":
        a = jax.random.randint(keys[3], (1, s * s), 0, 8)
        fn = lambda q, k, v, a: ops.token_aggregation_attention(
            flat(q), flat(k), flat(v), a, group=64, implementation=which
        )
        return jax.jit(fn), (q, k, v, a)
    fn = lambda q, k, v: ops.area_attention(flat(q), flat(k), flat(v), area=4, implementation=which)
    return jax.jit(fn), (q, k, jnp.asarray(v))


def worker(variant: str, impl: str, size: str) -> None:
    import jax

    fn, args = _fn_and_inputs(variant, impl, int(size))
    jax.block_until_ready(args)
    base = common.peak_rss_bytes()
    seconds = common.time_fn(fn, *args, repeats=3)
    print(json.dumps({"seconds": seconds, "peak_extra_bytes": common.peak_rss_bytes() - base}))


def _summary(rows) -> dict:
    by = {(r["variant"], r["implementation"], r["size"]): r.get("seconds") for r in rows}
    out = {}
    for (variant, impl, size), seconds in sorted(by.items()):
        if impl == EFFICIENT[variant]:
            dense = by.get((variant, VARIANTS[variant][1], size))
            out[f"{variant} {size}x{size}"] = {
                "speedup_over_dense": round(dense / seconds, 2) if dense and seconds else None
            }
    return out


def cpu(args) -> None:
    rows = []
    for variant, impls in VARIANTS.items():
        for size in QUICK if args.quick else SIZES:
            for impl in impls:
                row = {
                    "variant": variant,
                    "implementation": impl,
                    "size": size,
                    **common.run_worker(__name__, variant, impl, str(size)),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    config = {"B": 1, "dtype": "float32", "pass": "forward", "grid": "s x s", "heads": 2, "head_dim": 32}
    common.save("vision_variants", {"config": config, "rows": rows, "summary": _summary(rows)}, args)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(*sys.argv[2:])
