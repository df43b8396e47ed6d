"""Proving that kernels compile for a TPU that is not here (docs/kernels.md, "TPU").

The TPU twin of :mod:`kernels_pallas.compile_check`:

* :func:`lower_for_tpu` lowers a function for TPU as if a v5e were attached (an abstract mesh
  names the device kind for the Mosaic lowering; ``attnjax.core.platform.target("tpu")`` makes
  the library choose as it would on a TPU, and ``kernels_pallas.flash.tpu.compiled()`` builds
  compiled, not interpret-mode, kernels). The StableHLO text holds one ``tpu_custom_call`` per kernel.
* :func:`compile_for_v5e` runs the real Mosaic and XLA:TPU compilers of pip ``libtpu`` (the
  ``accel-check`` extra) against a compile-only v5e from ``jax.experimental.topologies``, and
  reports the compiler's memory analysis. libtpu can abort the whole process on a kernel it
  rejects, so callers run one case per subprocess: ``python -m kernels_pallas.compile_check_tpu
  --T 16384 --D 128`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec, use_abstract_mesh

from attnjax.core import platform
from kernels_pallas.flash import tpu as flash_tpu

V5E = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
TPU_CALL = "tpu_custom_call"


def lower_for_tpu(fn, *args) -> str:
    """The StableHLO text of ``jax.jit(fn)(*args)`` lowered for TPU on an abstract v5e."""
    mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=V5E)
    with platform.target("tpu"), flash_tpu.compiled(), use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def tpu_calls(hlo_text: str) -> int:
    """How many Mosaic kernels a lowered module launches."""
    return hlo_text.count(f"@{TPU_CALL}")


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def compile_for_v5e(fn, *args) -> dict:
    """Compiles ``jax.jit(fn)(*args)`` (args: arrays or ShapeDtypeStructs) for a compile-only
    TPU v5e and returns the compiler's memory analysis (bytes) and the compile time."""
    from jax.experimental import topologies

    device = topologies.get_topology_desc("v5e=1x1", platform="tpu").devices[0]
    sharding = NamedSharding(Mesh([device], ("x",)), PartitionSpec())
    specs = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a), sharding=sharding) for a in args]
    start = time.perf_counter()
    # The abstract mesh answers the Mosaic lowering's questions about the chip (its generation).
    mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=V5E)
    with platform.target("tpu"), flash_tpu.compiled(), use_abstract_mesh(mesh):
        lowered = jax.jit(fn).trace(*specs).lower()
        kernels = tpu_calls(lowered.as_text())
        compiled = lowered.compile()
    result = dict(compiled=True, kernels=kernels, compile_s=round(time.perf_counter() - start, 2))
    memory = compiled.memory_analysis()
    if memory is not None:
        for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                      "generated_code_size_in_bytes", "alias_size_in_bytes"):
            if hasattr(memory, field):
                result[field.removesuffix("_in_bytes")] = int(getattr(memory, field))
    return result


def flash_case(T: int, D: int, *, B: int = 1, H: int = 4, K: int = 2, dtype=jnp.bfloat16, kind: str = "causal"):
    """``(fn, args)``: value and gradients of flash attention with GQA ``H:K``. ``kind``: ``causal``,
    ``full``, ``window`` (1024 keys back), ``document`` (causal within documents whose segment ids
    are an argument, so traced: the kernels get full-width visit tables) or ``sigmoid`` (causal)."""
    from attnjax import masks, ops

    def loss(q, k, v, *ids):
        normalizer = "sigmoid" if kind == "sigmoid" else "softmax"
        mask = {"causal": masks.causal(), "sigmoid": masks.causal(), "full": None,
                "window": masks.sliding_window(1024, 0)}.get(kind)
        if kind == "document":
            mask = masks.document(ids[0]) & masks.causal()
        out = ops.attention(q, k, v, mask=mask, normalizer=normalizer, implementation="pallas")
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
