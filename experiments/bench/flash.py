"""Flash kernels on GPU: our softmax and sigmoid Pallas kernels vs the xla path vs cuDNN
(``jax.nn.dot_product_attention(implementation="cudnn")``) vs PyTorch SDPA (if importable).

    python -m experiments.bench.gpu flash           # T = 1K..32K, H=16, D=64/128, bf16 (GPU)
    python -m experiments.bench.gpu flash --quick   # tiny sizes; also runs on CPU (interpret mode)

For every case each implementation's output is first checked against the dense reference on
the last 256 queries (bottom-right alignment keeps their positions), then timed forward and
forward+backward. TFLOP/s count ``4 B H T S D`` per forward (half for causal) and 2.5x that for
the backward. Writes ``benchmarks/results/flash-gpu-<date>.json``.
"""

from __future__ import annotations

import json

from . import common

TOKENS = 32768  # batch * length, kept constant so short sequences still fill the GPU
CHECK_ROWS = 256


def _impls(causal: bool):
    import jax

    from attnjax import masks, ops

    mask = masks.causal() if causal else None
    impls = {
        "pallas_softmax": lambda q, k, v: ops.attention(q, k, v, mask=mask, implementation="pallas"),
        "pallas_sigmoid": lambda q, k, v: ops.sigmoid_attention(q, k, v, mask=mask, implementation="pallas"),
        "xla_softmax": lambda q, k, v: ops.attention(q, k, v, mask=mask, implementation="xla"),
    }
    if jax.default_backend() == "gpu":
        impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    return impls


def _reference(name, q, k, v, causal):
    from attnjax import masks, ops

    q = q[:, -CHECK_ROWS:]
    mask = masks.causal() if causal else None
    normalizer = "sigmoid" if "sigmoid" in name else "softmax"
    return ops.attention(q, k, v, mask=mask, normalizer=normalizer, implementation="reference")


def _torch_sdpa(B, T, H, D, causal, repeats):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    def fwd_bwd():
        fwd().sum().backward()

    def timed(fn):
        import time

        fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        return sorted(samples)[len(samples) // 2]

    return {"forward_s": timed(fwd), "forward_backward_s": timed(fwd_bwd)}


def gpu_payload(args) -> dict:
    """The GPU suite's measurements (correctness checks first, then timings)."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "gpu" and not args.quick:
        raise SystemExit("the flash benchmark needs a GPU (use --quick for a CPU smoke test)")
    lengths = (128,) if args.quick else (1024, 2048, 4096, 8192, 16384, 32768)
    H, head_dims = (2, (32,)) if args.quick else (16, (64, 128))
    tokens = 256 if args.quick else TOKENS
    repeats = 2 if args.quick else 10
    rows = []
    for D in head_dims:
        for T in lengths:
            B = max(1, tokens // T)
            keys = jax.random.split(jax.random.key(0), 3)
            q, k, v = (jax.random.normal(key, (B, T, H, D), jnp.bfloat16) for key in keys)
            for causal in (True, False):
                flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
                for name, fn in _impls(causal).items():
                    row = {"D": D, "T": T, "B": B, "H": H, "causal": causal, "implementation": name}
                    try:
                        out = jax.jit(fn)(q, k, v)
                        ref = _reference(name, *(x.astype(jnp.float32) for x in (q, k, v)), causal)
                        row["max_error_vs_reference"] = float(
                            jnp.abs(out[:, -CHECK_ROWS:].astype(jnp.float32) - ref).max())
                        fwd = jax.jit(fn)
                        fwd_bwd = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
                        row["forward_s"] = common.time_fn(fwd, q, k, v, repeats=repeats)
                        row["forward_backward_s"] = common.time_fn(fwd_bwd, q, k, v, repeats=repeats)
                        row["forward_tflops"] = flops / row["forward_s"] / 1e12
                        row["forward_backward_tflops"] = 3.5 * flops / row["forward_backward_s"] / 1e12
                    except Exception as e:  # noqa: BLE001 - a failing implementation is a result too
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                torch_row = _torch_sdpa(B, T, H, D, causal, repeats)
                if torch_row:
                    torch_row.update(D=D, T=T, B=B, H=H, causal=causal, implementation="torch_sdpa",
                                     forward_tflops=flops / torch_row["forward_s"] / 1e12)
                    rows.append(torch_row)
                    print(json.dumps(torch_row), flush=True)
    payload = {"config": {"dtype": "bfloat16", "tokens_per_batch": tokens, "check_rows": CHECK_ROWS},
               "rows": rows, "summary": _summary(rows)}
    return payload


def gpu(args) -> None:
    common.save("flash", gpu_payload(args), args)


def _summary(rows) -> dict:
    """Ratios the issue asks for: softmax forward vs cuDNN; sigmoid vs our softmax (T=8K, D=128)."""
    by = {(r["D"], r["T"], r["causal"], r["implementation"]): r for r in rows if "forward_s" in r}
    out = {}
    for (D, T, causal, impl), r in by.items():
        if impl != "pallas_softmax":
            continue
        key = f"D{D}_T{T}_{'causal' if causal else 'full'}"
        cudnn, sigmoid = by.get((D, T, causal, "cudnn")), by.get((D, T, causal, "pallas_sigmoid"))
        entry = {}
        if cudnn:
            entry["softmax_fwd_vs_cudnn"] = round(cudnn["forward_s"] / r["forward_s"], 3)
        if sigmoid:
            entry["sigmoid_fwd_vs_softmax"] = round(r["forward_s"] / sigmoid["forward_s"], 3)
        out[key] = entry
    return out

