"""Lightning attention throughput: attnjax lightning vs causal softmax, one run, side by side
(with zoo part 3's linear-time variants: Flowformer, fastmax, LightNet, NAP).

    python -m experiments.bench.cpu lightning           # T = 2K..64K; about 5 minutes on 2 cores
    python -m experiments.bench.cpu lightning --quick   # T = 512, 1K: a smoke test
    python -m experiments.bench.gpu lightning           # T = 4K..256K: Pallas vs fla vs cuDNN softmax

CPU: B=1, H=8, D=E=64, float32, forward pass; lightning ``implementation="xla"`` with the
TransNormerLLM slopes next to ``attnjax.ops.attention(..., mask=causal(), implementation="xla")``.
Causal softmax is quadratic: above ``SOFTMAX_MAX_T`` it is not run (its time per token only
grows; at 32K one call already takes minutes on 2 cores). Each (implementation, length) runs
in a fresh process. Targets (issue 4): time per token at 64K within 1.3x of 4K; lightning
faster than softmax from 4K up.

GPU: bf16, our Pallas kernel vs flash-linear-attention's ``fla.ops.simple_gla.chunk_simple_gla``
(the chunk kernel with a per-head scalar decay; skipped if ``fla`` is not importable) vs cuDNN
softmax (``jax.nn.dot_product_attention(implementation="cudnn")``). Target: tokens/s flat within
15% from 4K to 256K, ratio against fla recorded.
"""

from __future__ import annotations

import json
import sys

from . import common

B, H, D = 1, 8, 64
SOFTMAX_MAX_T = 16384
# Zoo part 3's linear-time variants (issue 22), causal, timed beside lightning: time per token
# should stay flat in length. fastmax carries 1 + D + D(D+1)/2 = 2145 features at D = 64 (its
# O(T D^2 E) is the paper's), so it is far slower per token than lightning, not steeper.
ZOO3 = {"flowformer-xla": "flow_attention", "fastmax-xla": "fastmax_attention",
        "lightnet-xla": "lightnet_attention", "nap-xla": "nap_attention"}


def _inputs(T: int, dtype: str):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (B, T, H, D), jnp.float32).astype(dtype) for kk in keys)
    return jax.block_until_ready((q, k, v))


def _fn(impl: str):
    import jax

    from attnjax import masks, ops

    log_decay = -ops.lightning_slopes(H)
    if impl.startswith("lightning-"):
        which = impl.split("-", 1)[1]
        return jax.jit(lambda q, k, v: ops.lightning_attention(q, k, v, log_decay=log_decay,
                                                               implementation=which))
    if impl == "softmax-xla":
        return jax.jit(lambda q, k, v: ops.attention(q, k, v, mask=masks.causal(), implementation="xla"))
    if impl == "softmax-cudnn":
        return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                    implementation="cudnn"))
    if impl == "fla-chunk":
        return _fla_fn(log_decay)
    if impl in ZOO3:  # zoo part 3's linear-time variants (issue 22), causal
        op = getattr(ops, ZOO3[impl])
        return jax.jit(lambda q, k, v: op(q, k, v, is_causal=True, implementation="xla"))
    raise ValueError(f"unknown implementation {impl!r}")


def _fla_fn(log_decay):
    """fla's chunk kernel (PyTorch/Triton) on torch copies of the inputs; timed through a callable
    taking JAX arrays so the timing loop is shared."""
    import numpy as np
    import torch
    from fla.ops.simple_gla import chunk_simple_gla

    g_per_head = torch.tensor(np.asarray(log_decay), device="cuda", dtype=torch.float32)
    cache = {}

    def run(q, k, v):
        if "qkv" not in cache:
            to = lambda x: torch.tensor(np.asarray(x.astype("float32")), device="cuda").to(torch.bfloat16)
            tq, tk, tv = to(q), to(k), to(v)
            g = g_per_head[None, None, :].expand(tq.shape[0], tq.shape[1], -1).contiguous()
            cache["qkv"] = (tq, tk, tv, g)
        tq, tk, tv, g = cache["qkv"]
        chunk_simple_gla(tq, tk, tv, g=g, scale=D**-0.5)
        torch.cuda.synchronize()  # the timing loop's block_until_ready sees no JAX arrays

    return run


def worker(impl: str, length: str, dtype: str = "float32") -> None:
    T = int(length)
    q, k, v = _inputs(T, dtype)
    base = common.peak_rss_bytes()
    # Linear-time paths are cheap: more repeats (median) against noise on a shared machine.
    quadratic = impl.startswith("softmax")
    seconds = common.time_fn(_fn(impl), q, k, v, repeats=3 if quadratic else 7,
                             min_time=0 if quadratic else 3.0)
    print(json.dumps({"seconds": seconds, "us_per_token": 1e6 * seconds / (B * T),
                      "tokens_per_s": B * T / seconds, "peak_extra_bytes": common.peak_rss_bytes() - base}))


def _run(lengths, impls, dtype, skip):
    rows = []
    for T in lengths:
        for impl in impls:
            if skip(impl, T):
                row = {"T": T, "implementation": impl, "skipped": f"quadratic; not run above T={SOFTMAX_MAX_T}"}
            else:
                row = {"T": T, "implementation": impl, **common.run_worker(__name__, impl, str(T), dtype)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _summary(rows, ours: str, others, base_T: int):
    by = {(r["T"], r["implementation"]): r for r in rows if "seconds" in r}
    out = {}
    base = by.get((base_T, ours))
    for T in sorted({r["T"] for r in rows}):
        mine = by.get((T, ours))
        if mine is None:
            continue
        entry = {"tokens_per_s": round(mine["tokens_per_s"])}
        if base is not None:
            entry[f"time_per_token_vs_{base_T}"] = round(mine["us_per_token"] / base["us_per_token"], 3)
        for other in others:
            if (T, other) in by:
                entry[f"speedup_over_{other}"] = round(by[(T, other)]["seconds"] / mine["seconds"], 2)
        out[T] = entry
    return out


def cpu(args) -> None:
    lengths = (512, 1024) if args.quick else (2048, 4096, 8192, 16384, 32768, 65536)
    impls = ("lightning-xla", "softmax-xla", *ZOO3)
    rows = _run(lengths, impls, "float32", lambda impl, T: impl.startswith("softmax") and T > SOFTMAX_MAX_T)
    base_T = 4096 if 4096 in lengths else lengths[0]
    payload = {"config": {"B": B, "H": H, "D": D, "E": D, "dtype": "float32", "pass": "forward",
                          "log_decay": "-lightning_slopes(8)", "softmax_max_T": SOFTMAX_MAX_T},
               "rows": rows, "summary": _summary(rows, "lightning-xla", ("softmax-xla",), base_T),
               "zoo3_summary": {name: _summary(rows, name, ("softmax-xla",), base_T) for name in ZOO3}}
    common.save("lightning", payload, args)


def gpu_payload(args) -> dict:
    """The GPU suite's measurements (correctness checks first, then timings)."""
    lengths = (256, 512) if args.quick else (4096, 8192, 16384, 32768, 65536, 131072, 262144)
    impls = ["lightning-pallas", "lightning-xla", "softmax-cudnn"]
    try:
        import fla.ops.simple_gla  # noqa: F401

        impls.append("fla-chunk")
    except Exception:  # noqa: BLE001 - fla (PyTorch + Triton) is an optional peer
        pass
    rows = _run(lengths, impls, "bfloat16", lambda impl, T: False)
    payload = {"config": {"B": B, "H": H, "D": D, "E": D, "dtype": "bfloat16", "pass": "forward",
                          "log_decay": "-lightning_slopes(8)"},
               "rows": rows,
               "summary": _summary(rows, "lightning-pallas", ("fla-chunk", "softmax-cudnn", "lightning-xla"),
                                   lengths[0])}
    return payload


def gpu(args) -> None:
    common.save("lightning", gpu_payload(args), args)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(*sys.argv[2:])
