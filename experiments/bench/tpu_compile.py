"""``python -m experiments.bench.tpu_compile --T 16384 --D 128 [--kind causal]``: compiles the TPU
flash kernels (value and gradients) for a compile-only TPU v5e with pip ``libtpu`` and prints one
JSON line (compile success, kernel count, the compiler's memory analysis). One case per process:
libtpu can abort the process on a kernel it rejects. ``tests/kernels/test_tpu_lowering.py``
(marker ``compile``) runs the table in ``benchmarks/results/tpu-compile-v5e.json`` through it.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from attnjax import masks, ops
from kernels_pallas.compile_check_tpu import compile_for_v5e


def flash_case(T: int, D: int, *, B: int = 1, H: int = 4, K: int = 2, dtype=jnp.bfloat16, kind: str = "causal"):
    """``(fn, args)``: value and gradients of flash attention with GQA ``H:K``. ``kind``: ``causal``,
    ``full``, ``window`` (1024 keys back), ``document`` (causal within documents whose segment ids
    are an argument, so traced: the kernels get full-width visit tables), ``sigmoid`` (causal) or
    ``dropout`` (causal, rate 0.1)."""
    def loss(q, k, v, *ids):
        normalizer = "sigmoid" if kind == "sigmoid" else "softmax"
        mask = {"causal": masks.causal(), "sigmoid": masks.causal(), "full": None,
                "window": masks.sliding_window(1024, 0)}.get(kind)
        if kind == "document":
            mask = masks.document(ids[0]) & masks.causal()
        dropout = dict(dropout_rate=0.1, dropout_key=jax.random.key(0)) if kind == "dropout" else {}
        if kind == "dropout":
            mask = masks.causal()
        out = ops.attention(q, k, v, mask=mask, normalizer=normalizer, implementation="pallas", **dropout)
        return out.astype(jnp.float32).sum()

    args = (jax.ShapeDtypeStruct((B, T, H, D), dtype), jax.ShapeDtypeStruct((B, T, K, D), dtype),
            jax.ShapeDtypeStruct((B, T, K, D), dtype))
    if kind == "document":
        args += (jax.ShapeDtypeStruct((B, T), jnp.int32),)
    return jax.value_and_grad(loss, argnums=(0, 1, 2)), args


def main(argv=None):
    # Other processes on this host may hold libtpu's lockfile (JAX initializes libtpu when it is
    # installed); a compile-only topology does not need exclusive use of a chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, required=True)
    parser.add_argument("--D", type=int, required=True)
    parser.add_argument("--kind", default="causal")
    parser.add_argument("--dtype", default="bfloat16")
    a = parser.parse_args(argv)
    fn, args = flash_case(a.T, a.D, dtype=jnp.dtype(a.dtype), kind=a.kind)
    result = dict(kernel="flash", T=a.T, D=a.D, kind=a.kind, dtype=a.dtype, **compile_for_v5e(fn, *args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
