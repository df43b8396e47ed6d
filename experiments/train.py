"""Train a model on a task with any attnjax attention variant.

    python -m experiments.train --config tiny_charlm [--steps 100 --variant linear ...]
    attnjax-train --config tiny_charlm          # the same, from an installed wheel
    python -m experiments.train --help          # every config key with its type and default

flax.nnx for the model, optax for the optimizer, orbax for checkpoints (periodic, the newest
``keep_checkpoints`` kept, each with the run's resolved config), and a device mesh with axes
``data``, ``fsdp``, ``tensor`` and ``context`` from the config: batches are sharded over
``data`` x ``fsdp`` (and their sequence over ``context``), parameters and optimizer state over
``fsdp``, and the attention call goes through ``attnjax.parallel.shard_op`` when ``tensor`` or
``context`` is larger than 1 (see :func:`attention_binder`).

Batch ``step`` is a pure function of ``(seed, step)``, so a resumed run sees exactly the
batches the uninterrupted run would have seen. A run writes ``out_dir/metrics.jsonl`` (one row
per step, one per evaluation), ``out_dir/curves.png``, ``out_dir/summary.json`` and with
``tensorboard=true`` TensorBoard event files in ``out_dir/tensorboard``; shows a tqdm progress
bar with its ETA, and at the end prints a one-line summary with the validation loss, for the
character-level LM a short generated sample, and the files it wrote.

A run whose ``out_dir`` holds checkpoints resumes from the newest one that reads (an unreadable
one is skipped with a warning), if the config differs from the stored one only in keys of
``experiments.config.RESUMABLE``. A non-finite loss or state stops the run (nothing non-finite is
saved). Expected failures raise :class:`TrainingError`; the CLI prints them as one line
``error: ...`` and exits 1 (2 for a config refused before the run, 130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import math
import signal
import sys
import threading
import types
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from attnjax import parallel

from . import config as config_lib, tasks, ui
from .model import Model, loss_and_metrics


class TrainingError(RuntimeError):
    """A run that cannot go on for a reason the user can act on: training diverged, or a checkpoint
    does not match this config or model, cannot be read, or cannot be written. ``main`` prints the
    one-line message as ``error: ...`` and exits 1."""


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


def param_shardings(mesh, params):
    """FSDP and tensor parallelism from the parameters' logical axes (every ``attnjax.nn``
    module names them) and ``attnjax.parallel.DEFAULT_RULES``: model features over ``fsdp``,
    heads and MLP hidden features over ``tensor``; an axis a mesh axis does not divide stays
    replicated."""
    return parallel.param_shardings(params, mesh)


def optimizer(cfg) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup, 1), max(cfg.steps, cfg.warmup + 1), end_value=cfg.lr * 0.1
    )
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


def _checkpoints(cfg, directory: Path):
    """Checkpoints of two items: ``state`` (parameters, optimizer state, step) and ``meta`` (the
    config, :func:`experiments.config.as_json`). Saving is synchronous, so a failed save (a full
    disk) raises at its own step, and a save is never cut short by the end of the run; the loop
    decides which steps to save. Half-written (``*.orbax-checkpoint-tmp``) directories left by a
    killed run are removed when the manager opens."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=False,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory.resolve(), options=options, item_handlers=handlers)


def _first_line(e: BaseException) -> str:
    """``Type: message`` on one line, at most ~250 characters: the first line of the message (orbax
    and tensorstore errors run to dozens), its middle elided (their cause, such as ``No space left
    on device``, comes last)."""
    lines = str(e).strip().splitlines()
    text = lines[0].split(" See full TensorStore details")[0] if lines else ""
    if len(text) > 250:
        text = f"{text[:120]} ... {text[-120:]}"
    return f"{type(e).__name__}: {text}"


def _array_name(path) -> str:
    """A tree path as orbax names the arrays it stores, without nnx's ``.value``: ``params.head.kernel``."""
    parts = [str(k.key if hasattr(k, "key") else k.idx if hasattr(k, "idx") else k.name) for k in path]
    return ".".join(parts[:-1] if parts[-1:] == ["value"] else parts)


def check_shapes(stored, abstract, where: str) -> None:
    """Raises :class:`TrainingError` naming the first array (parameters first) whose shape in a
    checkpoint (``stored``, orbax's metadata tree of the saved state) differs from the one the
    model expects (``abstract``), or that only one of the two has."""
    have = {_array_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
    want = {_array_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    for name in sorted(have.keys() | want.keys(), key=lambda n: (not n.startswith("params."), n)):
        old, new = have.get(name), want.get(name)
        if old != new:
            old, new = (f"shape {s}" if s is not None else "no such array" for s in (old, new))
            raise TrainingError(f"{where} does not fit this model: {name} has {old} in the checkpoint and "
                                f"{new} in the model; use a new out_dir, or delete the checkpoints to start "
                                f"fresh")


def restore_newest_intact(manager, abstract, cfg, *, warn) -> tuple[int, dict, dict] | None:
    """``(step, state, saved config)`` of the newest checkpoint in ``manager`` that restores onto
    ``abstract``, or None when there is no checkpoint.

    Checkpoints are tried newest first. One that cannot be read (a truncated or missing file, no
    stored config) is skipped with a one-line ``warn``; if none can be read, :class:`TrainingError`.
    One that reads but was written by a run with other settings
    (:func:`experiments.config.resume_conflicts`) or for a model of other shapes
    (:func:`check_shapes`) stops the run with :class:`TrainingError`: an older one would not fit
    either."""
    import orbax.checkpoint as ocp

    manager.reload()
    steps = sorted(manager.all_steps(), reverse=True)
    out = Path(cfg.out_dir)
    fresh = f"use a new out_dir, or delete {out} to start fresh"
    for i, step in enumerate(steps):
        where = f"checkpoint step {step} in {manager.directory}"
        try:
            saved = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            stored = manager.item_metadata(step)["state"]
            if not isinstance(saved, dict) or stored is None:
                raise ValueError("no stored config or array metadata")
            conflicts = config_lib.resume_conflicts(saved, cfg)
            if conflicts:
                raise TrainingError(f"cannot resume {out} from step {step}: it was trained with other "
                                    f"settings ({'; '.join(conflicts)}), which change the model, data or "
                                    f"optimizer; {fresh}")
            check_shapes(stored, abstract, where)
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            state = manager.restore(step, args=args)["state"]
        except TrainingError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a damaged checkpoint raises, try the next one
            then = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
            warn(f"{where} cannot be read ({_first_line(e)}); {then}")
            del e
            gc.collect()  # the failed read's coroutines are finalized now, under run()'s unraisablehook
            continue
        return step, state, saved
    if steps:
        raise TrainingError(f"no checkpoint in {manager.directory} can be read (steps "
                            f"{', '.join(map(str, steps))}); {fresh}")
    return None


def _drop_closed_loop_callbacks():
    """Installs a ``sys.unraisablehook`` that drops what a failed checkpoint read or write leaves
    behind and passes everything else on; returns the hook it replaced. After such a failure,
    tensorstore's operations still in flight call back into the asyncio loop that orbax has
    already closed (``RuntimeError: Event loop is closed``, some after the run has ended), and
    orbax's abandoned read coroutines raise when they are collected (an exception caused by
    ``GeneratorExit``); each prints a traceback that says nothing the error reported did not."""
    previous = sys.unraisablehook

    def hook(unraisable):
        e = unraisable.exc_value
        closed_loop = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
        abandoned = (isinstance(unraisable.object, types.CoroutineType)
                     and isinstance(e.__cause__, GeneratorExit))
        if not (closed_loop or abandoned):
            previous(unraisable)

    sys.unraisablehook = hook
    return previous


@contextlib.contextmanager
def _quiet_closed_loop_callbacks():
    previous = _drop_closed_loop_callbacks()
    try:
        yield
    finally:
        sys.unraisablehook = previous


class _Interrupt:
    """SIGINT (Ctrl-C) during :func:`run`: the first one asks the loop to stop after the step in
    progress (its losses checked and written, no save cut short); a second one raises
    ``KeyboardInterrupt`` at once. Installed only in the main thread, where signal handlers live."""

    requested = False

    def __enter__(self):
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


def run(cfg: config_lib.Config, *, quiet: bool = False) -> dict:
    """Trains (or resumes) ``cfg``; returns the summary (also written to ``out_dir/summary.json``).

    Raises :class:`TrainingError` when training diverges or a checkpoint cannot be resumed, read or
    written, and ``KeyboardInterrupt`` (after the step in progress) on Ctrl-C."""
    config_lib.validate(cfg, jax.device_count())
    directory = Path(cfg.out_dir) / "checkpoints"
    directory.parent.mkdir(parents=True, exist_ok=True)
    # A checkpoint already there is resumed even with checkpoint_every=0 (which only stops saving).
    manager = _checkpoints(cfg, directory) if cfg.checkpoint_every > 0 or directory.is_dir() else None
    with _quiet_closed_loop_callbacks(), _Interrupt() as interrupt, _closing(manager):
        return _run(cfg, quiet, interrupt, manager)


@contextlib.contextmanager
def _closing(manager):
    """Closes ``manager`` (if not None) on the way out; after an error, without masking it."""
    try:
        yield manager
    except BaseException:
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.close()
        raise
    if manager is not None:
        manager.close()


def _run(cfg: config_lib.Config, quiet: bool, interrupt: _Interrupt, manager) -> dict:
    import orbax.checkpoint as ocp

    task = tasks.get(cfg.task, cfg)
    out = Path(cfg.out_dir)
    mesh = make_mesh(cfg)
    model = Model(cfg, task, bind=attention_binder(cfg, mesh), rngs=nnx.Rngs(cfg.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optimizer(cfg)

    params = jax.device_put(params, param_shardings(mesh, params))
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
        # One flag for the host to check: the loss and every float of the new state are finite
        # (a non-finite gradient reaches the parameters or Adam's moments through the update).
        floats = [x for x in jax.tree.leaves(new) if jnp.issubdtype(x.dtype, jnp.floating)]
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.isfinite(x).all() for x in floats]))
        return new, loss, finite

    def eval_step(params, batch):
        return loss_fn(params, batch)[1]

    example = task.train_batch(cfg, 0)
    b_shardings = {k: batch_sharding(mesh, v) for k, v in example.items()}
    train_step = jax.jit(train_step, in_shardings=(shardings, b_shardings),
                         out_shardings=(shardings, replicated, replicated), donate_argnums=0)
    eval_step = jax.jit(eval_step, in_shardings=(shardings["params"], b_shardings), out_shardings=replicated)

    warn = lambda message: print(f"warning: {message}", file=sys.stderr)  # noqa: E731
    start, saved = 0, None
    if manager is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        found = restore_newest_intact(manager, abstract, cfg, warn=warn)
        if found is not None:
            start, state, saved = found
    if start > cfg.steps:
        raise TrainingError(f"{out} holds a checkpoint at step {start}, past steps={cfg.steps}; a run cannot "
                            f"be shortened: rerun with steps >= {start}, or use a new out_dir to start fresh")
    if start and start == cfg.steps and (out / "summary.json").is_file():
        print(f"{cfg.name}: already finished ({start} steps in {out}); summary.json left as it is. "
              f"Raise steps to train further, or use a new out_dir", file=sys.stderr)
        summary = json.loads((out / "summary.json").read_text())
        if not quiet:
            print(one_line(summary))
        return summary
    if manager is not None:  # unreadable checkpoints past the resumed one would block its saves
        for step in manager.all_steps():
            if step > start:
                manager.delete(step)
    log = ui.MetricsLog(out / "metrics.jsonl", resume_step=start if start else None)
    valid = [jax.device_put(b, b_shardings) for b in task.valid_batches(cfg)]
    tokens_per_step = cfg.batch_size * task.seq_len(cfg)
    bar = None if quiet else ui.ProgressBar(cfg.steps, initial=start)
    board = ui.TensorBoard(out / "tensorboard") if cfg.tensorboard else None
    if start and not quiet:
        longer = (f"; steps {saved['steps']} -> {cfg.steps}: the learning-rate schedule now spans {cfg.steps}"
                  if saved.get("steps", cfg.steps) != cfg.steps else "")
        print(f"resuming {cfg.name} from step {start} ({out / 'checkpoints'}){longer}", file=sys.stderr)

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
    pending: list = []  # (step, loss, finite) on the device, fetched when the loss is logged

    def throughput():
        if not steady_steps:
            return None
        return steady_steps * tokens_per_step / (ui.clock() - t_steady - eval_seconds)

    saving = manager is not None and cfg.checkpoint_every > 0
    last_saved = start or None
    last_valid: dict = {}
    try:  # the progress bar's line is ended however the loop ends
        for step in range(start, cfg.steps):
            batch = jax.device_put(task.train_batch(cfg, step), b_shardings)
            state, loss, finite = train_step(state, batch)
            pending.append((step + 1, loss, finite))
            done = step + 1
            if t_steady is None:
                jax.block_until_ready(loss)
                t_steady = ui.clock()
            else:
                steady_steps += 1
            log_now = done % cfg.log_every == 0 or done == cfg.steps
            eval_now = done % cfg.eval_every == 0 or done == cfg.steps
            save_now = saving and (done % cfg.checkpoint_every == 0 or done == cfg.steps)
            # The steps since the last check are checked before their state is evaluated or saved.
            if log_now or eval_now or save_now or interrupt.requested:
                losses, flags = jax.device_get(([l for _, l, _ in pending], [f for _, _, f in pending]))
                rows = [{"step": s, "loss": float(l)} for (s, _, _), l in zip(pending, losses)]
                pending = []
                bad = next((r for r, ok in zip(rows, flags) if not ok), None)
                if bad is not None:
                    log.write(rows[: rows.index(bad) + 1])
                    kept = (f"the last checkpoint is step {last_saved}, nothing later was saved" if last_saved
                            else "no checkpoint was saved")
                    raise TrainingError(f"training diverged at step {bad['step']}: the loss ({bad['loss']}) "
                                        f"or the updated parameters are not finite; {kept}. Lower lr (now "
                                        f"{cfg.lr:g}) and start again in a new out_dir")
                if log_now or eval_now:
                    speed = throughput()
                    rows[-1]["tokens_per_s"] = speed
                    if eval_now:
                        t_eval = ui.clock()
                        last_valid = {"step": done, **evaluate(state["params"])}
                        eval_seconds += ui.clock() - t_eval
                        rows.append(last_valid)
                    if bar is not None:
                        bar.update(done, loss=rows[-1 - eval_now]["loss"], tokens_per_s=speed,
                                   valid_loss=last_valid["valid_loss"] if eval_now else None)
                log.write(rows)
                if board is not None:
                    board.write(rows)
            if save_now:
                args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(config_lib.as_json(cfg)))
                try:
                    manager.save(done, args=args, force=True)
                    manager.wait_until_finished()
                except Exception as e:
                    kept = (f"the last checkpoint is step {last_saved}" if last_saved
                            else "no checkpoint was saved")
                    raise TrainingError(f"saving checkpoint step {done} in {manager.directory} failed "
                                        f"({_first_line(e)}); {kept}") from e
                last_saved = done
            if interrupt.requested:
                kept = (f"rerun the same command to resume from step {last_saved}" if last_saved
                        else "no checkpoint was saved")
                raise KeyboardInterrupt(f"stopped at step {done}; {kept}")
    finally:
        if bar is not None:
            bar.close()
        if board is not None:
            board.close()
    jax.block_until_ready(state)
    speed = throughput()
    seconds = ui.clock() - t_begin
    if not last_valid:  # resumed at the end (without a summary): nothing left to train
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
    (out / "summary.json").write_text(ui.dumps(summary, indent=2) + "\n")
    if cfg.plot:
        rows = ui.read_jsonl(out / "metrics.jsonl")
        ui.plot_curves(rows, out / "curves.png", f"{cfg.task} / {cfg.variant}")
    if not quiet:
        print(one_line(summary))
        if cfg.task == "charlm" and cfg.sample > 0:
            from . import sample

            model = nnx.merge(graphdef, state["params"], rest)
            batch = cfg.mesh_data * cfg.mesh_fsdp
            text = sample.generate(model, seq_len=task.seq_len(cfg), batch=batch, length=cfg.sample,
                                   seed=cfg.seed, place=lambda x: jax.device_put(x, batch_sharding(mesh, x)))
            print(f"sample (temperature 0.8, prompt {sample.PROMPT.decode()!r}):\n{text}")
        print(f"wrote {out}:")
        print("\n".join(ui.written(out)))
    return summary


def one_line(s: dict) -> str:
    speed = f"{s['tokens_per_s'] / 1e3:.1f}k tokens/s" if s["tokens_per_s"] else "n/a tokens/s"
    metric = f"{s['metric']} {s['valid_metric']:.3f}"
    return (f"{s['name']}: {s['task']}/{s['variant']} {s['steps']} steps, "
            f"validation loss {s['valid_loss']:.4f} "
            f"({metric}), {speed}, {ui.duration(s['seconds'])} -> {s['out_dir']}")


def _type_name(kind) -> str:
    """``int``, ``float``, ``str | None``, ``dict``: a key's type as ``--help`` shows it."""
    args = typing.get_args(kind)
    if args:
        return " | ".join("None" if a is type(None) else a.__name__ for a in args)
    return getattr(kind, "__name__", str(kind))


def parser(defaults: config_lib.Config | None = None) -> argparse.ArgumentParser:
    """The CLI: ``--config`` (a name or a file) and one typed option per config key
    (``--steps 50``, ``--variant linear``, ``--variant_options "{'window': 9}"``), whose help shows
    the key's type and its default (``defaults``': the chosen config's values). Options given on
    the command line are applied after ``--override key=value`` (which stays for scripts)."""
    cfg = defaults or config_lib.Config()
    p = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s --config NAME_OR_FILE [--KEY VALUE ...] [--override KEY=VALUE ...]",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="named configs: " + ", ".join(config_lib.names()))
    p.add_argument("--config", required=True, metavar="NAME_OR_FILE",
                   help="a named config (" + ", ".join(config_lib.names()) + ") or a file defining config()")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="change config keys, e.g. --override steps=50 variant=linear")
    keys = p.add_argument_group("config keys" + (f" (defaults: config {cfg.name!r})" if defaults else ""))
    for key, kind in typing.get_type_hints(config_lib.Config).items():
        names = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else [])
        keys.add_argument(*names, dest=f"key_{key}", default=argparse.SUPPRESS, metavar=key.upper(),
                          type=functools.partial(_parse_key, key, kind),
                          help=f"{_type_name(kind)} (default: {getattr(cfg, key)!r})")
    return p


def _parse_key(key: str, kind, text: str):
    try:
        return config_lib.parse(key, text, kind)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _load(argv) -> config_lib.Config:
    """The config the command line asks for: its file, then ``--override``, then the key options."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    first, _ = pre.parse_known_args(argv)
    base = None
    if first.config is not None:
        with contextlib.suppress(ValueError, TypeError):  # reported by the full load below
            base = config_lib.load(first.config)
    args = parser(base).parse_args(argv)
    cfg = config_lib.load(args.config, args.override)
    given = {k.removeprefix("key_"): v for k, v in vars(args).items() if k.startswith("key_")}
    return dataclasses.replace(cfg, **given)


def main(argv=None) -> int:
    # Expected failures are reported in one line below. Orbax also logs the errors of its writer
    # threads with their tracebacks, and tensorstore's late callbacks print more after the run
    # (_drop_closed_loop_callbacks): this process is ours, so both stay quiet to its end.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    _drop_closed_loop_callbacks()
    try:  # a bad config is reported in one line, before anything compiles
        cfg = _load(argv)
        config_lib.validate(cfg, jax.device_count())
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"interrupted{': ' if str(e) else ''}{e}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
