"""attnjax.parallel: every sharded form equals the unsharded reference, values and gradients,
on simulated CPU meshes (tests/conftest.py gives 8 devices) and across two processes."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from attnjax import masks, ops, parallel, score_mods
from tests.harness import Shape, check_vjp, normal

ROOT = Path(__file__).resolve().parents[2]


def mesh_of(**axes):
    n = int(np.prod(list(axes.values())))
    return parallel.make_mesh(axes, jax.devices()[:n])


def on_axis(fn, mesh, axis="context", n_in=3, extra=()):
    """``fn(q, k, v, *extra)`` under shard_map with the sequence of q/k/v on ``axis``."""
    seq = P(None, axis)
    return jax.shard_map(fn, mesh=mesh, in_specs=(seq,) * n_in + tuple(P() for _ in extra),
                         out_specs=seq, check_vma=False)


# --------------------------------------------------------------------------------------------
# Rules


def test_rules_map_logical_axes_to_present_mesh_axes():
    mesh = mesh_of(data=2, tensor=4)
    assert parallel.spec(("batch", "sequence", "heads", "head_dim"), mesh=mesh) == P("data", None, "tensor", None)
    rules = [("batch", ("data", "tensor")), ("heads", None)]
    assert parallel.spec(("batch", "heads"), rules) == P(("data", "tensor"), None)
    with pytest.raises(ValueError, match="unknown logical axis 'seq'"):
        parallel.as_rules({"seq": "context"})
    with pytest.raises(ValueError, match=r"needs 16 devices; there are 8"):
        parallel.make_mesh({"data": 4, "tensor": 4})
    assert parallel.as_rules([["batch", ["data"]]])["batch"] == ("data",)  # lists, as from a config file


@pytest.mark.parametrize("rules, match", [
    ({"batch": 3}, r"rule for 'batch' must be a mesh axis name, a sequence of them, or None \(strings\); got 3"),
    ({"heads": ("tensor", 2)}, r"rule for 'heads' must be a mesh axis name.*got \('tensor', 2\)"),
    ({0: "data"}, r"a rule's logical axis must be a name \(a string"),
    ([("batch", "data", "fsdp")], r"rules must map logical axis names to mesh axes; got entry"),
])
def test_rules_that_are_not_names_are_refused(rules, match):
    with pytest.raises(TypeError, match=match):
        parallel.as_rules(rules)


# --------------------------------------------------------------------------------------------
# The core: a Shard computes its piece of the global problem


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_a_shard_computes_its_piece_of_the_global_problem(impl):
    """Rows 16..40 and heads 2..3 of batch element 1, against every key: values and the
    gradients of the piece equal those of the global problem with the cotangent on the piece."""
    B, T, H, K, D = 2, 64, 4, 2, 8
    q, k, v = Shape(B=B, T=T, S=T, H=H, K=K, D=D, E=D).qkv(jax.random.key(11))
    seg = jnp.repeat(jnp.array([[0, 1], [0, 1]]), 32, axis=1)
    kw = dict(mask=masks.causal() & masks.document(seg), score_mod=score_mods.alibi(score_mods.alibi_slopes(H)),
              dropout_rate=0.2, dropout_key=jax.random.key(1))
    rows, heads, kv_heads = slice(16, 40), slice(2, 4), slice(1, 2)
    shard = ops.Shard.make(batch=B, heads=H, q_len=T, kv_len=T, batch_offset=1, head_offset=2, q_offset=16)
    run = lambda q_, k_, v_: ops.attention(q_, k_, v_, shard=shard, implementation=impl,
                                           block_sizes=ops.BlockSizes(8, 8), **kw)
    qp, kp, vp = q[1:2, rows, heads], k[1:2, :, kv_heads], v[1:2, :, kv_heads]
    out, vjp = jax.vjp(run, qp, kp, vp)
    ct = normal(jax.random.key(2), out.shape)
    full, full_vjp = jax.vjp(lambda *a: ops.attention(*a, implementation="reference", **kw), q, k, v)
    np.testing.assert_allclose(out, full[1:2, rows, heads], atol=2e-5)
    ct_full = jnp.zeros(full.shape).at[1:2, rows, heads].set(ct)
    dq, dk, dv = vjp(ct)
    rq, rk, rv = full_vjp(ct_full)
    np.testing.assert_allclose(dq, rq[1:2, rows, heads], atol=1e-4)
    np.testing.assert_allclose(dk, rk[1:2, :, kv_heads], atol=1e-4)
    np.testing.assert_allclose(dv, rv[1:2, :, kv_heads], atol=1e-4)


def test_shard_block_maps_are_slices_of_the_global_map():
    """A window's tile classes (traced offsets) equal the global block map's slice."""
    seg = jnp.repeat(jnp.array([[0, 1, 1, 2]]), 16, axis=1)
    for mask in (masks.causal(), masks.sliding_window(5, 9) | masks.document(seg),
                 masks.from_fn(lambda b, h, qi, ki: (qi // 7) == (ki // 5)), masks.neighborhood((8, 8), 3)):
        full = mask.block_map(64, 64, 8, 8)
        window = jax.jit(lambda q0, k0: mask.block_map(64, 64, 8, 8, window=(q0, 24, k0, 32)))(16, 8)
        np.testing.assert_array_equal(window, full[:, :, 2:5, 1:5], err_msg=repr(mask))


def test_shard_sizes_are_checked():
    q, k, v = Shape(B=2, T=16, S=16, H=4, K=2, D=8, E=8).qkv(jax.random.key(0))
    with pytest.raises(ValueError, match="shard.heads=2 is the global size; it cannot be smaller than the local heads=4"):
        ops.attention(q, k, v, shard=ops.Shard.make(batch=2, heads=2, q_len=16, kv_len=16))
    with pytest.raises(TypeError, match="shard must be an attnjax.ops.Shard"):
        ops.attention(q, k, v, shard=(0, 0))
    with pytest.raises(ValueError, match=r"document mask q_segment_ids has shape \(2, 16\); expected \[batch=2, q_len=32\]"):
        ops.attention(q, k, v, mask=masks.document(jnp.zeros((2, 16), jnp.int32)),
                      shard=ops.Shard.make(batch=2, heads=4, q_len=32, kv_len=32))


# --------------------------------------------------------------------------------------------
# Ring attention


SEG = jnp.repeat(jnp.array([[0, 1, 1, 2], [0, 0, 0, 1]]), 16, axis=1)  # [2, 64]
RING_CASES = {
    # name: (devices, layout, op kwargs, implementation inside the ring, dtype)
    "causal-docs-contiguous-P8": (8, "contiguous", dict(mask=masks.causal() & masks.document(SEG)), "xla", jnp.float32),
    "causal-alibi-zigzag-P4": (4, "zigzag", dict(mask=masks.causal()), "reference", jnp.float32),
    "sigmoid-window-P4": (4, "contiguous", dict(mask=masks.sliding_window(9, 3), normalizer="sigmoid"), "reference", jnp.float32),
    "dropout-zigzag-bf16-P2": (2, "zigzag", dict(mask=masks.causal(), dropout_rate=0.25, dropout_key=jax.random.key(3)),
                               "reference", jnp.bfloat16),
}


@pytest.mark.parametrize("case", RING_CASES)
def test_ring_attention_matches_reference(case):
    n, layout, kw, impl, dtype = RING_CASES[case]
    mesh = mesh_of(context=n)
    shape = Shape(B=2, T=64, S=64, H=4, K=2, D=8, E=8)
    q, k, v = shape.qkv(jax.random.key(0))
    slopes = score_mods.alibi_slopes(4)  # a learned ALiBi slope vector: gradients reach it
    order = (lambda x: parallel.zigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    back = (lambda x: parallel.unzigzag(x, n)) if layout == "zigzag" else (lambda x: x)
    alibi = "alibi" in case

    def ring(q, k, v, slopes):
        mod = score_mods.alibi(slopes) if alibi else None
        return parallel.ring_attention(q, k, v, axis_name="context", layout=layout, score_mod=mod,
                                       implementation=impl, block_sizes=ops.BlockSizes(8, 8), **kw)

    sharded = on_axis(ring, mesh, extra=(slopes,))
    fn = lambda q, k, v, s: back(sharded(order(q), order(k), order(v), s))
    ref = lambda q, k, v, s: ops.attention(q, k, v, score_mod=score_mods.alibi(s) if alibi else None,
                                           implementation="reference", **kw)
    check_vjp(fn, ref, (q, k, v, slopes), dtype, what=case)


def test_ring_returns_the_global_log_sum_exp():
    mesh = mesh_of(context=4)
    q, k, v = Shape(B=1, T=32, S=32, H=2, K=2, D=8, E=8).qkv(jax.random.key(1))
    ring = lambda q, k, v: parallel.ring_attention(q, k, v, axis_name="context", mask=masks.causal(),
                                                   return_lse=True, implementation="reference")
    out, lse = jax.shard_map(ring, mesh=mesh, in_specs=(P(None, "context"),) * 3,
                             out_specs=(P(None, "context"), P(None, "context")), check_vma=False)(q, k, v)
    ref, ref_lse = ops.attention(q, k, v, mask=masks.causal(), return_lse=True, implementation="reference")
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_zigzag_round_trips_and_balances_causal_work():
    x = jnp.arange(32)[None]
    np.testing.assert_array_equal(parallel.unzigzag(parallel.zigzag(x, 4), 4), x)
    # Causal work per device: the number of allowed (q, kv) pairs among its queries.
    rows = np.asarray(parallel.zigzag(x, 4)).reshape(4, 8) + 1  # query i sees i + 1 keys
    assert len(set(rows.sum(1).tolist())) == 1
    with pytest.raises(ValueError, match="divisible by 2 \\* num_shards = 8"):
        parallel.zigzag(jnp.arange(12)[None], 4)


# --------------------------------------------------------------------------------------------
# shard_op on the meshes


MESHES = {
    "8": dict(context=8),
    "4x2": dict(data=4, tensor=2),
    "2x2x2": dict(data=2, context=2, tensor=2),
}


@pytest.mark.parametrize("mesh_name", MESHES)
def test_shard_op_attention_matches_reference(mesh_name):
    mesh = mesh_of(**MESHES[mesh_name])
    shape = Shape(B=4, T=32, S=32, H=4, K=2, D=8, E=8)
    q, k, v = shape.qkv(jax.random.key(2))
    seg = jnp.repeat(jnp.array([[0, 1], [0, 0], [1, 1], [0, 2]]), 16, axis=1)
    kw = dict(mask=masks.causal() & masks.document(seg), dropout_rate=0.2, dropout_key=jax.random.key(5),
              block_sizes=ops.BlockSizes(8, 8))
    fn = parallel.shard_op(ops.attention, mesh)
    check_vjp(lambda q, k, v: fn(q, k, v, **kw), lambda q, k, v: ops.attention(q, k, v, implementation="reference", **kw),
              (q, k, v), jnp.float32, what=mesh_name)


def test_ulysses_matches_reference():
    mesh = mesh_of(context=4)
    q, k, v = Shape(B=1, T=32, S=32, H=8, K=4, D=8, E=8).qkv(jax.random.key(3))
    kw = dict(mask=masks.causal(), score_mod=score_mods.alibi(score_mods.alibi_slopes(8)))
    fn = parallel.shard_op(ops.attention, mesh, context="ulysses")
    check_vjp(lambda q, k, v: fn(q, k, v, implementation="reference", **kw),
              lambda q, k, v: ops.attention(q, k, v, implementation="reference", **kw), (q, k, v), jnp.float32)
    with pytest.raises(ValueError, match=r"kv_heads \(2\) divisible by the 4 devices"):
        q2, k2, v2 = Shape(B=1, T=32, S=32, H=8, K=2, D=8, E=8).qkv(jax.random.key(3))
        fn(q2, k2, v2)


def test_batch_and_head_sharding_moves_no_qkv():
    """The compiled program of the batch/head-sharded path has no collective at all."""
    mesh = mesh_of(data=4, tensor=2)
    q, k, v = Shape(B=4, T=32, S=32, H=4, K=2, D=8, E=8).qkv(jax.random.key(4))
    put = lambda x, names: jax.device_put(x, parallel.sharding(mesh, names))
    q = put(q, ("batch", "sequence", "heads", "head_dim"))
    k, v = (put(x, ("batch", "sequence", "kv_heads", "head_dim")) for x in (k, v))
    fn = jax.jit(functools.partial(parallel.shard_op(ops.attention, mesh), mask=masks.causal()))
    hlo = fn.lower(q, k, v).compile().as_text()
    for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
        assert collective not in hlo, collective
    np.testing.assert_allclose(fn(q, k, v), ops.attention(q, k, v, mask=masks.causal(), implementation="reference"),
                               atol=1e-5)


def test_shard_op_rejects_what_it_cannot_shard():
    mesh = mesh_of(data=4, tensor=2)
    q, k, v = Shape(B=2, T=16, S=16, H=4, K=1, D=8, E=8).qkv(jax.random.key(0))
    with pytest.raises(ValueError, match="batch 2 is not divisible by the 4 devices"):
        parallel.shard_op(ops.attention, mesh)(q, k, v)
    q, k, v = Shape(B=4, T=16, S=16, H=4, K=1, D=8, E=8).qkv(jax.random.key(0))
    with pytest.raises(ValueError, match=r"kv_heads \(1\) divisible by 2"):
        parallel.shard_op(ops.attention, mesh)(q, k, v)
    with pytest.raises(ValueError, match="batch only"):
        parallel.shard_op(ops.agent_attention, mesh)(q, k, v)


@pytest.mark.parametrize("op", ["moa", "hyper"])
def test_batch_sharded_randomness_is_the_unsharded_one(op):
    """Batch-sharded MoA with dropout and HyperAttention (hashes, column sample) draw per global
    batch element: the shards compute the unsharded op's reference (which the unsharded fast
    path equals, tests/ops/test_sparse.py), not one draw repeated on every shard."""
    mesh = mesh_of(data=4)
    q, k, v = Shape(B=4, T=24, S=24, H=2, K=1, D=8, E=8).qkv(jax.random.key(8))
    fn, kw = {
        "moa": (ops.moa_attention, dict(alpha=(2, 6), beta=(0.0, 0.1), sinks=2, dropout_rate=0.3,
                                        dropout_key=jax.random.key(1))),
        "hyper": (ops.hyper_attention, dict(key=jax.random.key(2), bucket_size=8, sample_size=6)),
    }[op]
    sharded = jax.jit(lambda q, k, v: parallel.shard_op(fn, mesh)(q, k, v, **kw))(q, k, v)
    np.testing.assert_allclose(sharded, fn(q, k, v, implementation="reference", **kw), atol=2e-5)


# --------------------------------------------------------------------------------------------
# State passing, halo exchange


def test_lightning_state_passing_matches_reference():
    mesh = mesh_of(data=2, context=4)
    B, T, H, D = 2, 64, 2, 8
    q, k, v = (normal(key, (B, T, H, D), scale=0.5) for key in jax.random.split(jax.random.key(6), 3))
    seg = jnp.array([[0] * 40 + [1] * 24, [0] * 16 + [1] * 48])  # boundaries inside and at a chunk edge
    s0 = normal(jax.random.key(7), (B, H, D, D))
    log_decay = -ops.lightning_slopes(H)
    fn = parallel.shard_op(ops.lightning_attention, mesh)
    run = lambda q, k, v, a, s0, impl, f: f(q, k, v, log_decay=a, initial_state=s0, segment_ids=seg,
                                            implementation=impl)
    check_vjp(lambda *a: run(*a, "xla", fn), lambda *a: run(*a, "reference", ops.lightning_attention),
              (q, k, v, log_decay, s0), jnp.float32, tol_scale=5)
    out, final = fn(q, k, v, log_decay=log_decay, initial_state=s0, segment_ids=seg, return_final_state=True)
    _, ref_final = ops.lightning_attention(q, k, v, log_decay=log_decay, initial_state=s0, segment_ids=seg,
                                           return_final_state=True, implementation="reference")
    np.testing.assert_allclose(final, ref_final, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("is_causal", [False, True])
def test_linear_context_parallel_matches_reference(is_causal):
    mesh = mesh_of(context=4)
    q, k, v = Shape(B=2, T=32, S=32, H=2, K=1, D=8, E=8).qkv(jax.random.key(8))
    fn = parallel.shard_op(ops.linear_attention, mesh)
    check_vjp(lambda q, k, v: fn(q, k, v, is_causal=is_causal, normalize="mala"),
              lambda q, k, v: ops.linear_attention(q, k, v, is_causal=is_causal, normalize="mala",
                                                   implementation="reference"),
              (q, k, v), jnp.float32, tol_scale=5)


@pytest.mark.parametrize("spatial, kw", [
    ((32, 6), dict(kernel_size=(5, 3), dilation=(2, 1))),
    ((40,), dict(kernel_size=7, stride=2, is_causal=True)),
])
def test_halo_neighborhood_matches_reference(spatial, kw):
    mesh = mesh_of(context=4)
    shape = (2, *spatial, 2)
    q, k, v = (normal(key, (*shape, 8)) for key in jax.random.split(jax.random.key(9), 3))
    fn = parallel.shard_op(ops.neighborhood_attention, mesh)
    check_vjp(lambda q, k, v: fn(q, k, v, **kw),
              lambda q, k, v: ops.neighborhood_attention(q, k, v, implementation="reference", **kw),
              (q, k, v), jnp.float32)


def test_halo_rejects_windows_wider_than_a_shard():
    mesh = mesh_of(context=8)
    q = jnp.zeros((1, 16, 2, 8))
    with pytest.raises(ValueError, match="reaches 6 rows along the sharded axis, more than the 2 rows"):
        parallel.shard_op(ops.neighborhood_attention, mesh)(q, q, q, kernel_size=7)


# --------------------------------------------------------------------------------------------
# Two processes


_WORKER = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
    from attnjax import masks, ops, parallel
    assert jax.process_count() == 2 and len(jax.devices()) == 4
    mesh = parallel.make_mesh({"context": 4})
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, 32, 2, 8)) for key in keys)  # the same on both processes
    spec = jax.sharding.NamedSharding(mesh, P(None, "context"))
    glob = lambda x: jax.make_array_from_callback(x.shape, spec, lambda idx: x[idx])
    ring = lambda q, k, v: parallel.ring_attention(q, k, v, axis_name="context", layout="zigzag",
                                                   mask=masks.causal(), implementation="reference")
    f = jax.jit(jax.shard_map(ring, mesh=mesh, in_specs=(P(None, "context"),) * 3,
                              out_specs=P(None, "context"), check_vma=False))
    zz = lambda x: parallel.zigzag(x, 4)
    gq, gk, gv = glob(zz(q)), glob(zz(k)), glob(zz(v))
    out = f(gq, gk, gv)
    grad = jax.jit(jax.grad(lambda q, k, v: (f(q, k, v) ** 2).sum()))(gq, gk, gv)
    ref = parallel.zigzag(ops.attention(q, k, v, mask=masks.causal(), implementation="reference"), 4)
    ref_grad = zz(jax.grad(lambda q: (ops.attention(q, k, v, mask=masks.causal(), implementation="reference") ** 2).sum())(q))
    for got, want in ((out, ref), (grad, ref_grad)):
        for shard in got.addressable_shards:
            np.testing.assert_allclose(np.asarray(shard.data), np.asarray(want[shard.index]), atol=1e-5)
    print("process", jax.process_index(), "ok")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ring_attention(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, str(script), port, str(i)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
        assert f"process {i} ok" in out
