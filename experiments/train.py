"""Train a model on a task with any attnjax attention variant.

    python -m experiments.train --config experiments/configs/tiny_charlm.py [--override key=value ...]

flax.nnx for the model, optax for the optimizer, orbax for checkpoints (periodic, the newest
``keep_checkpoints`` kept; a run whose ``out_dir`` holds checkpoints resumes from the latest),
and a device mesh with axes ``data``, ``fsdp``, ``tensor`` and ``context`` from the config:
batches are sharded over ``data`` x ``fsdp`` (and their sequence over ``context``), parameters
and optimizer state over ``fsdp``, and the attention call goes through
``attnjax.parallel.shard_op`` when ``tensor`` or ``context`` is larger than 1 (see
:func:`attention_binder`).

Batch ``step`` is a pure function of ``(seed, step)``, so a resumed run sees exactly the
batches the uninterrupted run would have seen. A run writes ``out_dir/metrics.jsonl`` (one row
per step, one per evaluation), ``out_dir/curves.png`` and ``out_dir/summary.json``, and prints a
one-line summary with the validation loss.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from attnjax import parallel
from experiments import config as config_lib, tasks, ui
from experiments.model import Model, loss_and_metrics



def make_mesh(cfg) -> jax.sharding.Mesh:
    """The config's mesh over the first ``data * fsdp * tensor * context`` devices."""
    return parallel.make_mesh(cfg.mesh_shape, devices=jax.devices()[: math.prod(cfg.mesh_shape.values())])


def attention_binder(cfg, mesh):
    """``(op, **kwargs) -> attention_fn`` placing attention on the mesh: through
    ``attnjax.parallel.shard_op`` (ring attention, state passing or halo exchange over
    ``context``; heads over ``tensor``) when either is sharded; otherwise the op itself (batch
    sharding needs nothing: every op is pure JAX under ``jax.jit``)."""
    if cfg.mesh_tensor == 1 and cfg.mesh_context == 1:
        return functools.partial
    return lambda op, **kwargs: functools.partial(parallel.shard_op(op, mesh), **kwargs)


def batch_sharding(mesh, x: np.ndarray) -> NamedSharding:
    """Batch axis over data x fsdp; the sequence axis (of per-token arrays) over context: the
    logical axes of ``attnjax.parallel.DEFAULT_RULES``, as ``shard_op`` expects them."""
    names = ("batch", "sequence", *([None] * (x.ndim - 2)))[: x.ndim]
    return parallel.sharding(mesh, names)


def param_sharding(mesh, x) -> NamedSharding:
    """FSDP: the largest axis that the ``fsdp`` size divides is sharded over it; the rest replicated."""
    n = mesh.shape["fsdp"]
    spec = [None] * np.ndim(x)
    if n > 1:
        for axis in sorted(range(np.ndim(x)), key=lambda a: -x.shape[a]):
            if x.shape[axis] % n == 0:
                spec[axis] = "fsdp"
                break
    return NamedSharding(mesh, P(*spec))


def optimizer(cfg) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup, 1), max(cfg.steps, cfg.warmup + 1), end_value=cfg.lr * 0.1
    )
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


def _checkpoints(cfg, directory: Path):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints, save_interval_steps=cfg.checkpoint_every, create=True
    )
    return ocp.CheckpointManager(directory.resolve(), options=options)


def run(cfg: config_lib.Config, *, quiet: bool = False) -> dict:
    """Trains (or resumes) ``cfg``; returns the summary (also written to ``out_dir/summary.json``)."""
    import orbax.checkpoint as ocp

    config_lib.validate(cfg, jax.device_count())
    task = tasks.get(cfg.task, cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(cfg)
    model = Model(cfg, task, bind=attention_binder(cfg, mesh), rngs=nnx.Rngs(cfg.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optimizer(cfg)

    params = jax.device_put(params, jax.tree.map(lambda x: param_sharding(mesh, x), params))
    state = {"params": params, "opt": jax.jit(tx.init)(params), "step": jnp.zeros((), jnp.int32)}
    replicated = NamedSharding(mesh, P())
    shardings = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, state
    )
    state = jax.device_put(state, shardings)

    def loss_fn(p, batch):
        return loss_and_metrics(nnx.merge(graphdef, p, rest), batch, cfg.aux_weight)

    def train_step(state, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt": opt, "step": state["step"] + 1}
        return new, loss

    def eval_step(params, batch):
        return loss_fn(params, batch)[1]

    example = task.train_batch(cfg, 0)
    b_shardings = {k: batch_sharding(mesh, v) for k, v in example.items()}
    train_step = jax.jit(train_step, in_shardings=(shardings, b_shardings),
                         out_shardings=(shardings, replicated), donate_argnums=0)
    eval_step = jax.jit(eval_step, in_shardings=(shardings["params"], b_shardings), out_shardings=replicated)

    manager = _checkpoints(cfg, out / "checkpoints") if cfg.checkpoint_every > 0 else None
    start = 0
    if manager is not None and manager.latest_step() is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        restored = manager.restore(manager.latest_step(), args=args)
        state = restored["state"]
        start = int(state["step"])
    log = ui.MetricsLog(out / "metrics.jsonl", resume_step=start if start else None)
    valid = [jax.device_put(b, b_shardings) for b in task.valid_batches(cfg)]
    tokens_per_step = cfg.batch_size * task.seq_len(cfg)
    bar = None if quiet else ui.ProgressBar(cfg.steps)
    if start and not quiet:
        print(f"resuming {cfg.name} from step {start} ({out / 'checkpoints'})", file=sys.stderr)

    def evaluate(params) -> dict:
        sums = np.zeros(3)
        for b in valid:
            sums += np.array([float(x) for x in eval_step(params, b)])
        nll, correct, total = sums
        row = {"valid_loss": nll / max(total, 1.0)}
        bits = task.metric == "bits/byte"
        row["valid_metric"] = row["valid_loss"] / math.log(2) if bits else correct / max(total, 1)
        return row

    t_begin = ui.clock()
    # Throughput counts the steps after the first (compiling) one, and not evaluation time.
    t_steady, steady_steps, eval_seconds = None, 0, 0.0
    pending: list = []

    def throughput():
        if not steady_steps:
            return None
        return steady_steps * tokens_per_step / (ui.clock() - t_steady - eval_seconds)

    last_valid: dict = {}
    for step in range(start, cfg.steps):
        batch = jax.device_put(task.train_batch(cfg, step), b_shardings)
        state, loss = train_step(state, batch)
        pending.append((step + 1, loss))
        done = step + 1
        if t_steady is None:
            jax.block_until_ready(loss)
            t_steady = ui.clock()
        else:
            steady_steps += 1
        log_now = done % cfg.log_every == 0 or done == cfg.steps
        eval_now = done % cfg.eval_every == 0 or done == cfg.steps
        if log_now or eval_now:
            rows = [{"step": s, "loss": float(l)} for s, l in pending]
            pending = []
            speed = throughput()
            rows[-1]["tokens_per_s"] = speed
            if eval_now:
                t_eval = ui.clock()
                last_valid = {"step": done, **evaluate(state["params"])}
                eval_seconds += ui.clock() - t_eval
                rows.append(last_valid)
            log.write(rows)
            if bar is not None:
                bar.update(done, loss=rows[-1 - eval_now]["loss"], tokens_per_s=speed,
                           valid_loss=last_valid["valid_loss"] if eval_now else None)
        if manager is not None:
            args = ocp.args.Composite(state=ocp.args.StandardSave(state))
            manager.save(done, args=args, force=done == cfg.steps)
    jax.block_until_ready(state)
    speed = throughput()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    if bar is not None:
        bar.close()
    seconds = ui.clock() - t_begin
    if not last_valid:  # resumed at the end: nothing left to train
        last_valid = {"step": int(state["step"]), **evaluate(state["params"])}
    train_rows = [r for r in ui.read_jsonl(out / "metrics.jsonl") if "loss" in r]
    summary = {
        "name": cfg.name, "task": cfg.task, "variant": cfg.variant, "implementation": cfg.implementation,
        "steps": cfg.steps, "resumed_from": start,
        "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
        "valid_loss": last_valid["valid_loss"], "metric": task.metric,
        "valid_metric": last_valid["valid_metric"],
        "tokens_per_s": speed,
        "seconds": seconds, "parameters": int(sum(x.size for x in jax.tree.leaves(state["params"]))),
        "mesh": cfg.mesh_shape, "devices": math.prod(cfg.mesh_shape.values()), "out_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if cfg.plot:
        rows = ui.read_jsonl(out / "metrics.jsonl")
        ui.plot_curves(rows, out / "curves.png", f"{cfg.task} / {cfg.variant}")
    if not quiet:
        print(one_line(summary))
    return summary


def one_line(s: dict) -> str:
    speed = f"{s['tokens_per_s'] / 1e3:.1f}k tokens/s" if s["tokens_per_s"] else "n/a tokens/s"
    metric = f"{s['metric']} {s['valid_metric']:.3f}"
    return (f"{s['name']}: {s['task']}/{s['variant']} {s['steps']} steps, "
            f"validation loss {s['valid_loss']:.4f} "
            f"({metric}), {speed}, {ui.duration(s['seconds'])} -> {s['out_dir']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True,
                        help="a file experiments/configs/<name>.py defining config()")
    parser.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="change config keys, e.g. --override steps=50 variant=linear")
    args = parser.parse_args(argv)
    try:  # a bad config is reported in one line, before anything compiles
        cfg = config_lib.load(args.config, args.override)
        config_lib.validate(cfg, jax.device_count())
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
