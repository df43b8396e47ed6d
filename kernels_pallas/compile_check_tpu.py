"""Proving that kernels compile for a TPU that is not here (docs/kernels.md, "TPU").

The TPU twin of :mod:`kernels_pallas.compile_check`:

* :func:`lower_for_tpu` lowers a function for TPU as if a v5e were attached (an abstract mesh
  names the device kind for the Mosaic lowering; ``attnjax.core.platform.target("tpu")`` makes
  the library choose as it would on a TPU and build compiled, not interpret-mode, kernels). The
  StableHLO text holds one ``tpu_custom_call`` per kernel.
* :func:`compile_for_v5e` runs the real Mosaic and XLA:TPU compilers of pip ``libtpu`` (the
  ``accel-check`` extra) against a compile-only v5e from ``jax.experimental.topologies``, and
  reports the compiler's memory analysis. libtpu can abort the whole process on a kernel it
  rejects, so callers run one case per subprocess: ``python -m experiments.bench.tpu_compile
  --T 16384 --D 128`` prints one JSON line.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from jax.sharding import (
    AbstractDevice,
    AbstractMesh,
    AxisType,
    Mesh,
    NamedSharding,
    PartitionSpec,
    use_abstract_mesh,
)

from attnjax.core import platform

V5E = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
TPU_CALL = "tpu_custom_call"


def lower_for_tpu(fn, *args) -> str:
    """The StableHLO text of ``jax.jit(fn)(*args)`` lowered for TPU on an abstract v5e."""
    mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=V5E)
    with platform.target("tpu"), use_abstract_mesh(mesh):
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
    with platform.target("tpu"), use_abstract_mesh(mesh):
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
