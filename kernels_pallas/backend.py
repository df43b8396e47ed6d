"""The one place that decides how Pallas kernels run on the current platform.

* CPU: interpret mode (the kernels run as ordinary XLA programs; this is what the tests use).
* GPU: compiled through Pallas' Triton lowering; head dims and tiles are padded to powers of
  two >= 16 (Triton's block shapes and tensor-core dots need them).
* TPU: not validated yet, so kernels report NotImplementedError there and ``attnjax`` falls
  back to its XLA path rather than risking a wrong or failing compile.

Every kernel family asks this module, and only this module, about the platform; tile-size
defaults live with :class:`attnjax.core.BlockSizes`.
"""

from __future__ import annotations

import jax
import jax.extend

from attnjax.core import platform as platform_lib
from attnjax.core.blocks import BlockSizes
from attnjax.core.utils import next_pow2, round_up


def platform() -> str:
    """``"gpu"``, ``"tpu"`` or ``"cpu"`` (``attnjax.core.platform.current``: a compile check's
    ``platform.target("gpu")`` makes the kernels build for a GPU that is not here)."""
    return platform_lib.current()


def interpret() -> bool:
    """Pallas kernels run in interpret mode on CPU (tests), compiled on an accelerator or under
    ``platform.target(name)`` (``attnjax.core.platform.interpret``)."""
    return platform_lib.interpret()


def tpu_interpret_params():
    """The TPU kernels' ``interpret=``: TPU semantics simulated on the host in interpret mode,
    ``False`` (compiled with Mosaic) otherwise."""
    if not interpret():
        return False
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


TPU_KERNELS = ("flash", "lightning")
"""Kernel families with a TPU (Mosaic) variant; the others decline on TPU."""


def require_supported(kernel: str) -> None:
    """Declines (NotImplementedError, at trace time) on a platform the kernels are not validated on."""
    if platform() == "tpu" and kernel not in TPU_KERNELS:
        raise NotImplementedError(f"the Pallas {kernel} kernels are not validated on TPU")


def pad_head_dim(dim: int) -> int:
    """The head dim a kernel works with: unchanged in interpret mode; a power of two >= 16 on
    GPU (Triton's dot needs it). Padding is with zeros, which leaves dot products unchanged."""
    return dim if interpret() else next_pow2(dim, 16)


def clip_tile(block: int, length: int) -> int:
    """A tile for a sequence of ``length``: at most the (8-rounded) length in interpret mode; a
    power of two >= 16, at most the length's, when compiled."""
    if interpret():
        return min(block, round_up(length, 8))
    return min(next_pow2(block, 16), next_pow2(length, 16))


def flash_tiles(q_len: int, kv_len: int, block_sizes: BlockSizes | None) -> BlockSizes:
    """The flash kernels' tiles: the caller's, else the platform defaults, each clipped."""
    bs = (block_sizes or BlockSizes()).resolve("flash", platform())
    q = lambda n: clip_tile(n, q_len)
    k = lambda n: clip_tile(n, kv_len)
    return BlockSizes(q(bs.block_q), k(bs.block_k), q(bs.block_q_dq), k(bs.block_k_dq),
                      q(bs.block_q_dkv), k(bs.block_k_dkv), bs.spatial)


def unlowerable_primitives(fn, *args) -> set[str]:
    """The primitives inside the Pallas kernels of ``fn(*args)`` (its forward and, where it is
    differentiable, its backward) that the GPU (Triton) lowering has no rule for. Empty where the
    lowering's rule table cannot be read (then nothing is declined on this ground)."""
    try:
        from jax._src.pallas.triton import lowering as triton_lowering

        rules = {getattr(p, "name", str(p)) for p in triton_lowering.triton_lowering_rules}
    except (ImportError, AttributeError):  # a JAX without the table: trust the kernels
        return set()
    found: set[str] = set()

    def walk(jaxpr, inside: bool):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if inside and name not in rules:
                found.add(name)
            for sub in _sub_jaxprs(eqn.params):
                walk(sub, inside or name == "pallas_call")

    walk(jax.make_jaxpr(fn)(*args).jaxpr, False)
    return found


def _sub_jaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def require_lowerable(kernel: str, fn, *args) -> None:
    """Declines (NotImplementedError, at trace time, before any kernel is built) a configuration
    whose kernels the GPU lowering would reject: a mask, score mod or dropout that gathers or
    slices inside the kernel. ``fn(q, k, v, *rest)`` is differentiated with respect to q, k, v
    too, so the backward kernels count."""
    def forward_and_backward(q, k, v, *rest):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *rest), q, k, v)
        return out, vjp(out)

    try:
        bad = unlowerable_primitives(forward_and_backward, *args)
    except (ValueError, TypeError, NotImplementedError) as e:  # e.g. a mask capturing an array constant
        raise NotImplementedError(f"the Pallas {kernel} kernels cannot be traced for {platform()}: {e}") from e
    if bad:
        raise NotImplementedError(
            f"the Pallas {kernel} kernels cannot be compiled for {platform()}: the problem's mask, score "
            f"mod or dropout uses {sorted(bad)} inside the kernel (read arrays with attnjax.core.tiling.take)"
        )


# Triton launch configuration per kernel family and head dim: more warps for wide tiles keep the
# float32 accumulators in registers; fewer pipeline stages keep a kernel's shared memory under the
# 227 KiB of an H100/H200 block. Chosen from the sm_90 compile report
# (benchmarks/results/gpu-compile-sm90.json: shared memory, registers, stack per kernel).
TRITON_CONFIGS = {
    # family: ((max head dim, num_warps, num_stages), ...), first match wins
    "flash": ((64, 4, 3), (128, 8, 2), (256, 8, 1)),
    "lightning": ((64, 4, 2), (128, 8, 1)),
}


def compiler_params(family: str, head_dim: int) -> dict:
    """``pallas_call`` keywords for a compiled kernel of ``family`` (none in interpret mode)."""
    if interpret() or platform() != "gpu":
        return {}
    from jax.experimental.pallas import triton as plgpu

    for max_dim, warps, stages in TRITON_CONFIGS[family]:
        if head_dim <= max_dim:
            return dict(compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages))
    raise NotImplementedError(f"the Pallas {family} kernels take head dims up to "
                              f"{TRITON_CONFIGS[family][-1][0]} on GPU; got {head_dim}")
