"""Proving that kernels compile for a GPU that is not here (docs/kernels.md, "Compile checks").

:func:`lower_for_gpu` lowers a function for CUDA as if an H100 were attached: an abstract mesh
names the device kind for Pallas' Triton lowering, and ``attnjax.core.platform.target("gpu")``
makes the library build its compiled (not interpret-mode) kernels and choose as it would on a GPU.
The result is the StableHLO module XLA would compile, with one Triton custom call per kernel.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from attnjax.core import platform

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
TRITON_CALL = "__gpu$xla.gpu.triton"


def lower_for_gpu(fn, *args) -> str:
    """The StableHLO text of ``jax.jit(fn)(*args)`` lowered for CUDA on an abstract H100."""
    mesh = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,), abstract_device=H100)
    with platform.target("gpu"), use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def triton_calls(hlo_text: str) -> int:
    """How many Triton kernels a lowered module launches."""
    return hlo_text.count(TRITON_CALL)


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One kernel as Pallas' Triton lowering built it: its name, Triton IR and launch config."""

    name: str
    ttir: str
    num_warps: int
    num_stages: int


def capture_triton(fn, *args) -> list[TritonKernel]:
    """The Triton kernels of ``jax.jit(fn)(*args)`` lowered for CUDA, in launch order.

    Wraps the lowering's Triton-module builder for the duration of the call (a private JAX
    function: if it moves, this raises and the ``compile`` tests fail loudly)."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    lowering = registration.lowering
    original, modules = lowering.lower_jaxpr_to_triton_module, []

    def capture(*a, **kw):
        result = original(*a, **kw)
        modules.append(result.module.operation.get_asm())
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        text = lower_for_gpu(lambda *a: fn(*a), *args)  # a fresh function: no cached lowering
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    configs = re.findall(r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)
    if len(configs) != len(modules):
        raise RuntimeError(f"captured {len(modules)} Triton modules but the lowering launches {len(configs)}")
    return [TritonKernel(name, ttir, int(warps), int(stages))
            for (name, stages, warps), ttir in zip(configs, modules)]


SHARED_MEMORY_LIMIT = 227 * 1024
"""Bytes of shared memory one block may use on H100/H200 (sm_90)."""


def compile_sm90(kernel: TritonKernel) -> dict:
    """Compiles a captured kernel to an sm_90 binary with the pip ``triton`` package (the
    ``accel-check`` extra) and reports ``shared`` memory bytes per block, ``registers`` per thread
    and ``stack`` bytes per thread (local memory: register spills), as the ``cuobjdump`` that
    triton ships reads them from the binary."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kernel.name}.ttir"
        path.write_text(kernel.ttir)
        compiled = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages))
        # Triton ran ptxas for the cubin; the cuobjdump it ships reads the resource usage back.
        cubin = Path(tmp) / f"{kernel.name}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True)
        if usage.returncode:
            raise RuntimeError(f"cuobjdump failed on {kernel.name}: {usage.stderr.strip()}")

    field = lambda key: max((int(n) for n in re.findall(rf"{key}:(\d+)", usage.stdout)), default=0)
    return dict(name=kernel.name, num_warps=kernel.num_warps, num_stages=kernel.num_stages,
                shared=int(compiled.metadata.shared), registers=field("REG"), stack=field("STACK"))
