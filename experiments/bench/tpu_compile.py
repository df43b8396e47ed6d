"""``python -m experiments.bench.tpu_compile --T 16384 --D 128 [--kernel flash] [--kind causal]``:
compiles the TPU kernels (value and gradients) of ``--kernel`` (``flash``, ``neighborhood``,
``lightning``) for a compile-only TPU v5e with pip ``libtpu`` and prints one JSON line (compile
success, kernel count, the compiler's memory analysis). One case per process:
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
from attnjax._layout import folder

compile_for_v5e = folder("kernels_pallas.compile_check_tpu").compile_for_v5e


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


NEIGHBORHOOD_KINDS = {
    # kind: (spatial shape for T tokens, kernel_size); T is the total token count.
    "1d": (lambda T: (T,), 129),
    "2d": (lambda T: (int(round(T ** 0.5)),) * 2, (13, 13)),
    "3d": (lambda T: (16, *(int(round((T // 16) ** 0.5)),) * 2), (5, 7, 7)),
}


def neighborhood_case(T: int, D: int, *, B: int = 1, H: int = 4, K: int = 2, dtype=jnp.bfloat16, kind: str = "2d"):
    """``(fn, args)``: value and gradients of neighborhood attention on ``T`` tokens laid out as
    ``kind`` (``1d``: ``T``, window 129; ``2d``: ``sqrt(T)^2``, 13x13; ``3d``: ``16 x sqrt(T/16)^2``,
    5x7x7), GQA ``H:K``, the TPU spatial tiles (128, 16x8, 8x4x4)."""
    shape, kernel_size = NEIGHBORHOOD_KINDS[kind]
    spatial = shape(T)

    def loss(q, k, v):
        out = ops.neighborhood_attention(q, k, v, kernel_size=kernel_size, implementation="pallas")
        return out.astype(jnp.float32).sum()

    args = (jax.ShapeDtypeStruct((B, *spatial, H, D), dtype), jax.ShapeDtypeStruct((B, *spatial, K, D), dtype),
            jax.ShapeDtypeStruct((B, *spatial, K, D), dtype))
    return jax.value_and_grad(loss, argnums=(0, 1, 2)), args


def lightning_case(T: int, D: int, *, B: int = 1, H: int = 4, dtype=jnp.bfloat16, kind: str = "decay"):
    """``(fn, args)``: value and gradients (q, k, v, log_decay, initial state) of lightning attention
    with per-head decays, the final state returned too; ``kind="documents"`` adds segment ids."""
    def loss(q, k, v, a, s0, *ids):
        out, final = ops.lightning_attention(q, k, v, log_decay=a, initial_state=s0, return_final_state=True,
                                             segment_ids=ids[0] if ids else None, implementation="pallas")
        return out.astype(jnp.float32).sum() + final.sum()

    args = (*(jax.ShapeDtypeStruct((B, T, H, D), dtype) for _ in range(3)), jax.ShapeDtypeStruct((H,), jnp.float32),
            jax.ShapeDtypeStruct((B, H, D, D), jnp.float32))
    if kind == "documents":
        args += (jax.ShapeDtypeStruct((B, T), jnp.int32),)
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)), args


CASES = {"flash": flash_case, "neighborhood": neighborhood_case, "lightning": lightning_case}


def ring_compile(T: int, D: int, *, devices: int = 4, B: int = 1, H: int = 4, K: int = 2, kind: str = "causal") -> dict:
    """Compiles value and gradients of ``attnjax.parallel.ring_attention`` (``kind``: ``causal``
    contiguous or ``zigzag``) inside ``jax.shard_map`` over ``devices`` chips of a compile-only
    v5e 2x2 topology, ``T`` global tokens, with dispatch planning for TPU (``implementation=None``:
    pallas first). Also reports whether ``implementation="pallas"`` alone is accepted: the TPU
    flash kernel declines a ``Shard`` at trace time, so the ring's blocks fall back to xla."""
    import time

    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from attnjax import parallel
    from attnjax.core import platform
    from kernels_pallas.compile_check_tpu import tpu_calls

    topo = topologies.get_topology_desc("v5e=2x2", platform="tpu")
    mesh = Mesh(topo.devices[:devices], ("context",))
    spec = P(None, "context")
    layout = "zigzag" if kind == "zigzag" else "contiguous"

    def make(impl):
        def local(q, k, v):
            return parallel.ring_attention(q, k, v, axis_name="context", layout=layout, mask=masks.causal(),
                                           implementation=impl)

        ring = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
        return jax.value_and_grad(lambda q, k, v: ring(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))

    sharding = NamedSharding(mesh, spec)
    args = [jax.ShapeDtypeStruct((B, T, n, D), jnp.bfloat16, sharding=sharding) for n in (H, K, K)]
    result = dict(devices=devices, topology="v5e=2x2")
    with platform.target("tpu"):
        try:
            jax.jit(make("pallas")).trace(*args)
            result["pallas_only"] = "accepted"
        except NotImplementedError as e:
            result["pallas_only"] = f"declined: {e}"
        start = time.perf_counter()
        lowered = jax.jit(make(None)).trace(*args).lower()
        result["kernels"] = tpu_calls(lowered.as_text())
        compiled = lowered.compile()
    result.update(compiled=True, compile_s=round(time.perf_counter() - start, 2))
    memory = compiled.memory_analysis()
    for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes", "alias_size_in_bytes"):
        if memory is not None and hasattr(memory, field):
            result[field.removesuffix("_in_bytes")] = int(getattr(memory, field))
    return result


def main(argv=None):
    # Other processes on this host may hold libtpu's lockfile (JAX initializes libtpu when it is
    # installed); a compile-only topology does not need exclusive use of a chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, required=True)
    parser.add_argument("--D", type=int, required=True)
    parser.add_argument("--kernel", default="flash", choices=[*CASES, "ring"])
    parser.add_argument("--kind", default=None, help="the case's variant (default: the kernel's first)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--devices", type=int, default=4, help="ring only: chips of the v5e 2x2 topology")
    a = parser.parse_args(argv)
    kind = a.kind or {"flash": "causal", "neighborhood": "2d", "lightning": "decay", "ring": "causal"}[a.kernel]
    if a.kernel == "ring":
        result = dict(kernel="ring", T=a.T, D=a.D, kind=kind, dtype="bfloat16", **ring_compile(a.T, a.D, devices=a.devices, kind=kind))
        print(json.dumps(result), flush=True)
        return
    fn, args = CASES[a.kernel](a.T, a.D, dtype=jnp.dtype(a.dtype), kind=kind)
    result = dict(kernel=a.kernel, T=a.T, D=a.D, kind=kind, dtype=a.dtype, **compile_for_v5e(fn, *args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
