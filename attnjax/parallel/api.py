"""``shard_op``: run an attnjax op on arrays sharded over a mesh, by the logical axis rules.

Pallas calls are opaque to XLA's sharding propagation, and the blockwise paths would be
partitioned without knowing that batch elements and heads are independent; ``shard_op`` says
it explicitly with ``shard_map``: each device runs the op on its own batch elements and heads
(no communication), and when the sequence axis is sharded too, the op's context-parallel form:

==========================================  ==================================================
op                                          sequence sharded with
==========================================  ==================================================
``attention``, ``sigmoid_attention``        ring attention (``context="ring"``, contiguous or
                                            zig-zag layout) or all-to-all (``"ulysses"``)
``lightning_attention``                     recurrent-state passing
``linear_attention``                        summaries ``psum`` (non-causal) or state passing
``neighborhood_attention``                  halo exchange along the first spatial axis
any other op                                batch sharding only (an op taking ``shard=``, e.g.
                                            ``moa_attention``, ``hyper_attention``, is told its
                                            batch offset, so its randomness is the unsharded one)
==========================================  ==================================================

Masks, score mods and dropout see global batch, head and sequence positions, so the sharded
result equals the unsharded one. Mask and score-mod arrays are replicated.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from attnjax import ops
from attnjax.core import Shard
from attnjax.parallel import rules as rules_lib
from attnjax.parallel.halo import halo_neighborhood_attention
from attnjax.parallel.recurrent import lightning_context_parallel, linear_context_parallel
from attnjax.parallel.ring import ring_attention, unzigzag, zigzag
from attnjax.parallel.ulysses import ulysses_attention

CONTEXT = ("ring", "ulysses")
_SOFTMAX_OPS = (ops.attention, ops.sigmoid_attention)


def shard_op(op, mesh: Mesh, rules: rules_lib.Rules | None = None, *, context: str = "ring",
             layout: str = "contiguous"):
    """Wraps ``op`` (an :mod:`attnjax.ops` function) to run sharded over ``mesh``.

    The returned ``fn(q, k, v, **op_kwargs)`` takes global arrays (any sharding; under ``jit``
    give them the sharding of :func:`attnjax.parallel.spec` to avoid any movement) with logical
    axes ``(batch, sequence, heads, head_dim)`` for ``q`` and ``(batch, sequence, kv_heads,
    head_dim)`` for ``k``/``v`` (for neighborhood attention the first spatial axis is the
    sequence axis), and returns the output sharded the same way as ``q``.

    Args:
      op: the attnjax op.
      mesh: the device mesh.
      rules: logical axis rules (default :data:`attnjax.parallel.DEFAULT_RULES`).
      context: for softmax/sigmoid attention with a sharded sequence, ``"ring"`` or
        ``"ulysses"``.
      layout: ``"contiguous"`` or ``"zigzag"`` (ring only; inputs are reordered inside and the
        output restored, so callers always pass the natural order).

    >>> import jax
    >>> from attnjax import masks, ops, parallel
    >>> mesh = parallel.make_mesh({"data": 2, "context": 2, "tensor": 2})
    >>> q = k = v = jax.random.normal(jax.random.key(0), (2, 16, 4, 8))
    >>> out = parallel.shard_op(ops.attention, mesh)(q, k, v, mask=masks.causal())
    >>> ref = ops.attention(q, k, v, mask=masks.causal(), implementation="reference")
    >>> bool(abs(out - ref).max() < 1e-5)
    True
    """
    if context not in CONTEXT:
        raise ValueError(f"context must be one of {CONTEXT}; got {context!r}")
    if layout not in ("contiguous", "zigzag"):
        raise ValueError(f"layout must be 'contiguous' or 'zigzag'; got {layout!r}")
    if layout == "zigzag" and (context != "ring" or op not in _SOFTMAX_OPS):
        raise ValueError("layout='zigzag' is for ring attention (ops.attention / ops.sigmoid_attention)")
    axes = {name: rules_lib.mesh_axes(name, rules, mesh) for name in rules_lib.LOGICAL_AXES}
    size = lambda name: rules_lib.axis_size(axes[name], mesh)
    if len(axes["sequence"]) > 1:
        raise ValueError(f"the sequence axis maps to several mesh axes {axes['sequence']}; context "
                         "parallelism runs over one mesh axis")
    seq_axis = axes["sequence"][0] if size("sequence") > 1 else None

    @functools.wraps(op)
    def fn(q, k, v, **kwargs):
        name = getattr(op, "__name__", repr(op))
        B, H, K = q.shape[0], q.shape[-2], k.shape[-2]
        nb, nh = size("batch"), size("heads")
        kind = _kind(op)
        if kind == "other" and (nh > 1 or seq_axis):
            raise ValueError(f"shard_op shards {name} over batch only; map heads and sequence to no mesh "
                             f"axis (or size-1 axes) in the rules")
        if B % nb:
            raise ValueError(f"batch {B} is not divisible by the {nb} devices of mesh axes {axes['batch']}")
        if nh > 1 and (H % nh or K % nh or axes["kv_heads"] != axes["heads"]):
            raise ValueError(f"sharding heads over {axes['heads']} ({nh} devices) needs heads ({H}) and "
                             f"kv_heads ({K}) divisible by {nh}, and kv_heads mapped to the same mesh axes "
                             f"(got {axes['kv_heads']})")
        if seq_axis and q.shape[1] % mesh.shape[seq_axis]:
            raise ValueError(f"sequence length {q.shape[1]} is not divisible by the {mesh.shape[seq_axis]} "
                             f"devices of mesh axis {seq_axis!r}")
        spec = lambda *names: rules_lib.spec(names, rules, mesh)
        inner = (None,) * (q.ndim - 4)  # neighborhood attention's other spatial axes
        q_spec = spec("batch", "sequence", *inner, "heads", "head_dim")
        kv_spec = spec("batch", "sequence", *inner, "kv_heads", "head_dim")
        sharded_kw, kw_specs, static_kw = _split_kwargs(kind, kwargs, spec)
        zig = layout == "zigzag" and seq_axis is not None
        n_seq = mesh.shape[seq_axis] if seq_axis else 1

        def body(q, k, v, sharded_kw):
            b0 = _index(axes["batch"], mesh) * q.shape[0]
            h0 = _index(axes["heads"], mesh) * q.shape[-2]
            kw = {**static_kw, **sharded_kw}
            return _local(kind, op, q, k, v, kw, seq_axis, context, layout, (B, b0), (H, h0))

        out_spec = q_spec
        if kwargs.get("return_lse"):
            out_spec = (q_spec, spec("batch", "sequence", "heads"))
        if kwargs.get("return_final_state"):  # the global final state, the same on every context device
            out_spec = (q_spec, spec("batch", "heads", None, None))
        mapped = jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, kw_specs),
                               out_specs=out_spec, check_vma=False)
        if zig:
            q, k, v = (zigzag(x, n_seq) for x in (q, k, v))
        out = mapped(q, k, v, sharded_kw)
        if zig:
            out = jax.tree.map(lambda x: unzigzag(x, n_seq), out)
        return out

    return fn


def _kind(op) -> str:
    if op in _SOFTMAX_OPS:
        return "attention"
    return {ops.lightning_attention: "lightning", ops.linear_attention: "linear",
            ops.neighborhood_attention: "neighborhood"}.get(op, "other")


def _split_kwargs(kind, kwargs, spec):
    """Keyword arguments holding arrays become ``shard_map`` inputs (with their specs); the
    rest stay static. Mask and score-mod arrays are replicated; lightning's per-head decays,
    per-token segment ids and per-(batch, head) states are sharded like the data."""
    per_data = {"log_decay": ("heads",), "segment_ids": ("batch", "sequence"),
                "initial_state": ("batch", "heads", None, None)} if kind == "lightning" else {}
    sharded, specs, static = {}, {}, {}
    for key, value in kwargs.items():
        leaves = jax.tree.leaves(value)
        if key in per_data and isinstance(value, jax.Array) and jnp.ndim(value) == len(per_data[key]):
            sharded[key], specs[key] = value, spec(*per_data[key])
        elif leaves and all(isinstance(x, jax.Array) for x in leaves):
            sharded[key], specs[key] = value, jax.tree.map(lambda _: PartitionSpec(), value)
        else:
            static[key] = value
    return sharded, specs, static


def _index(mesh_axes, mesh):
    """This device's linear index over ``mesh_axes`` (0 if none), row-major as PartitionSpec."""
    idx = jnp.int32(0)
    for a in mesh_axes:
        idx = idx * mesh.shape[a] + lax.axis_index(a)
    return idx


def _local(kind, op, q, k, v, kw, seq_axis, context, layout, batch_shard, head_shard):
    """The op on this device's block."""
    shards = dict(batch_shard=batch_shard, head_shard=head_shard)
    if kind == "attention":
        if op is ops.sigmoid_attention:
            kw = {**kw, "normalizer": "sigmoid"}
        if seq_axis is None:
            (gb, b0), (gh, h0) = batch_shard, head_shard
            shard = Shard.make(batch=gb, heads=gh, q_len=q.shape[1], kv_len=k.shape[1],
                               batch_offset=b0, head_offset=h0)
            return ops.attention(q, k, v, shard=shard, **kw)
        if context == "ulysses":
            return ulysses_attention(q, k, v, axis_name=seq_axis, **shards, **kw)
        return ring_attention(q, k, v, axis_name=seq_axis, layout=layout, **shards, **kw)
    if kind == "neighborhood" and seq_axis is not None:
        return halo_neighborhood_attention(q, k, v, axis_name=seq_axis, **shards, **kw)
    if kind == "lightning" and seq_axis is not None:
        return lightning_context_parallel(q, k, v, axis_name=seq_axis, **kw)
    if kind == "linear" and seq_axis is not None:
        return linear_context_parallel(q, k, v, axis_name=seq_axis, **kw)
    if kind == "other" and "shard" in inspect.signature(op).parameters:
        # Ops with randomness (dropout, HyperAttention's sample) draw it from global indices.
        (gb, b0), (gh, h0) = batch_shard, head_shard
        kw = {**kw, "shard": Shard.make(batch=gb, heads=gh, q_len=q.shape[1], kv_len=k.shape[1],
                                        batch_offset=b0, head_offset=h0)}
    return op(q, k, v, **kw)
