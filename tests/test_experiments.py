"""experiments.train: each task trains, bad configs fail early, a diverging run stops, a resume
takes only a checkpoint of the same run (falling back past damaged ones), runs interrupted by
SIGKILL, SIGINT or a damaged checkpoint resume to the same losses, and sharded meshes
(data x fsdp, data x context) reproduce the single-device losses."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import config, tasks, train, ui

ROOT = Path(__file__).resolve().parents[1]
TINY = ["layers=2", "width=32", "heads=2", "seq_len=64", "batch_size=8", "eval_batches=1", "warmup=1",
        "log_every=2", "eval_every=100", "checkpoint_every=0", "plot=false", "sample=0"]


def _cfg(name: str, tmp_path, *overrides) -> config.Config:
    return config.load(ROOT / "experiments" / "configs" / f"{name}.py",
                       [*TINY, f"out_dir={tmp_path / name}", *overrides])


def _losses(out_dir) -> list[float]:
    return [r["loss"] for r in ui.read_jsonl(Path(out_dir) / "metrics.jsonl") if "loss" in r]


def _main(out_dir, *overrides) -> int:
    """``python -m experiments.train`` in this process, on the tiny char-LM."""
    return train.main(["--config", str(ROOT / "experiments/configs/tiny_charlm.py"),
                       "--override", *TINY, f"out_dir={out_dir}", *overrides])


def _manager(out_dir):
    return train._checkpoints(config.Config(), Path(out_dir) / "checkpoints")


def _damage(out_dir, step: int, how: str) -> Path:
    """Truncates (to half) or deletes the largest data file of checkpoint ``step``."""
    files = [f for f in (Path(out_dir) / "checkpoints" / str(step) / "state").rglob("*") if f.is_file()]
    victim = max(files, key=lambda f: f.stat().st_size)
    if how == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.unlink()
    return victim


RESUMABLE_RUN = ["steps=4", "checkpoint_every=2", "keep_checkpoints=2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4; tests copy it before touching it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _main(out, *RESUMABLE_RUN) == 0
    return out


def _copy(run: Path, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.parametrize("name, variant",
                         [("tiny_charlm", "softmax"), ("mqar", "linear"), ("digits", "agent"),
                          ("maxset", "isab")])
def test_each_task_trains(tmp_path, name, variant):
    cfg = _cfg(name, tmp_path, "steps=4", f"variant={variant}", "plot=true", "lr=1e-2")
    summary = train.run(cfg, quiet=True)
    losses = _losses(cfg.out_dir)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert min(losses[1:]) < losses[0], losses  # a step at lr 1e-2 already lowers the loss
    assert math.isfinite(summary["valid_loss"]) and summary["tokens_per_s"] > 0
    assert (Path(cfg.out_dir) / "curves.png").stat().st_size > 0
    assert summary["variant"] == variant and summary["task"] == cfg.task
    if name == "maxset":  # the set task's config trains ISAB blocks pooled by PMA
        assert dict(cfg.variant_options) == {"pool": "pma"}


def test_help_lists_every_key_with_its_type_and_the_configs_default(capsys):
    with pytest.raises(SystemExit):
        train.main(["--config", "tiny_charlm", "--help"])
    text = capsys.readouterr().out
    for key in config.typing.get_type_hints(config.Config):
        assert f"--{key} " in text, key
    assert "--steps STEPS         int (default: 300)" in text  # tiny_charlm's steps, not Config's
    assert "--implementation IMPLEMENTATION\n                        str | None (default: None)" in text


def test_a_run_by_name_with_key_options_shows_a_sample_the_files_and_tensorboard(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--config", "tiny_charlm", "--override", *TINY, "--steps", "2", "--sample", "20",
            "--tensorboard", "true", "--out-dir", str(out)]
    assert train.main(args) == 0
    printed = capsys.readouterr()
    assert "100%|" in printed.err and "<00:00" in printed.err  # tqdm's bar, its elapsed<ETA
    assert "sample (temperature 0.8, prompt 'def '):\ndef " in printed.out
    assert f"wrote {out}:" in printed.out and "metrics.jsonl" in printed.out and "tensorboard/" in printed.out
    (events,) = (out / "tensorboard").glob("events.out.tfevents.*")
    assert events.stat().st_size > 0
    assert config.load("tiny_charlm") == config.load(ROOT / "experiments/configs/tiny_charlm.py")


@pytest.mark.parametrize("overrides, message", [
    (["variant=flash_magic"], "unknown attention variant 'flash_magic'; known variants: softmax, sigmoid"),
    (["task=imagenet"], "unknown task 'imagenet'"),
    (["mesh_data=3"], "does not divide the 8 available"),
    (["mesh_data=2", "batch_size=5"], "batch_size=5 is not divisible by mesh_data * mesh_fsdp = 2"),
    (["mesh_context=4", "seq_len=66"], "not divisible by mesh_context=4"),
    (["variant=agent"], "variant 'agent' is not causal"),
    (["variant=linear", "variant_options={'window': 3}"], "unknown ['window']"),
    (["lr=0"], "lr must be > 0"),
    (["lr=-1e-3"], "lr must be > 0"),
    (["lr=nan"], "lr must be > 0"),
    (["grad_clip=-1"], "grad_clip must be > 0"),
    (["checkpoint_every=-5"], "checkpoint_every must be >= 0 (0: no checkpoints); got -5"),
    (["warmup=-1"], "warmup must be >= 0"),
    (["task_options={'max_bytes': 40}"], "training text has 40 bytes, too few for a window of seq_len=64"),
    (["task_options={'max_bytes': 0}"], "max_bytes'] must be >= 1"),
    (["task_options={'max_byte': 1000}"], "takes task_options ['max_bytes']; got unknown ['max_byte']"),
    (["task=mqar", "task_options={'num_kv': 0}"], "num_kv'] must be >= 1"),
    (["task=mqar", "task_options={}", "seq_len=16"], "num_kv=8 pairs need seq_len >= 32"),
    (["task=digits", "task_options={}", "batch_size=4096"], "batch_size=4096 is more than the 1438 training"),
])
def test_bad_configs_fail_before_compiling(tmp_path, overrides, message):
    cfg = _cfg("tiny_charlm", tmp_path, *overrides)
    with pytest.raises(ValueError) as err:
        config.validate(cfg, 8)
    assert message in str(err.value)


def test_overrides_parse_by_type_and_reject_unknown_keys():
    cfg = config.override(config.Config(), ["steps=7", "lr=0.5", "implementation=none", "plot=false",
                                            "task_options={'num_kv': 4}"])
    got = (cfg.steps, cfg.lr, cfg.implementation, cfg.plot, cfg.task_options)
    assert got == (7, 0.5, None, False, {"num_kv": 4})
    with pytest.raises(ValueError, match="unknown config key 'stpes'"):
        config.override(cfg, ["stpes=3"])
    with pytest.raises(ValueError, match="expected a int"):
        config.override(cfg, ["steps=many"])


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    cfg = _cfg("mqar", tmp_path)
    task = tasks.get("mqar", cfg)
    a, b = task.train_batch(cfg, 5), task.train_batch(cfg, 5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["inputs"], task.train_batch(cfg, 6)["inputs"])
    # MQAR scores exactly num_kv queries per row, each a key whose target is its paired value.
    n = cfg.task_options["num_kv"]
    assert (a["weights"].sum(1) == n).all()
    pairs = dict(zip(a["inputs"][0, : 2 * n : 2].tolist(), a["inputs"][0, 1 : 2 * n : 2].tolist()))
    scored = a["weights"][0] > 0
    assert [pairs[k] for k in a["inputs"][0][scored]] == a["targets"][0][scored].tolist()


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    """lr=1e30: the loss is NaN within a few steps. The run stops at the next check (the save at
    step 4, before writing it) naming the first bad step, exits 1, keeps only finite checkpoints, and
    metrics.jsonl stays strict JSON (null, not a bare NaN)."""
    out = tmp_path / "run"
    assert _main(out, "steps=12", "lr=1e30", "log_every=4", "checkpoint_every=2", "keep_checkpoints=2") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    strict = lambda line: json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    rows = [strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    bad = next(r["step"] for r in rows if r["loss"] is None)
    assert err.startswith(f"error: training diverged at step {bad}:"), err
    assert "lower lr (now 1e+30)" in err.lower()
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] < bad) and rows[-1]["step"] == bad
    manager = _manager(out)
    assert manager.all_steps() and max(manager.all_steps()) < bad, manager.all_steps()
    state = manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["state"]))


def test_resume_refuses_a_changed_model_data_or_optimizer(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path)
    summary = (out / "summary.json").read_bytes()
    assert _main(out, *RESUMABLE_RUN, "variant=sigmoid", "lr=1e-3", "steps=6") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: cannot resume {out} from step 4"), err
    assert "variant: 'softmax' -> 'sigmoid'; lr: 0.003 -> 0.001" in err and "use a new out_dir" in err
    assert (out / "summary.json").read_bytes() == summary
    assert not config.RESUMABLE & {"variant", "lr", "seed", "seq_len", "width", "task_options"}


def test_resume_continues_with_more_steps_and_allowed_changes(finished_run, tmp_path, capsys):
    """More steps, other log/eval/checkpoint intervals and another mesh continue the run; each new
    checkpoint stores the config it was written with."""
    out = _copy(finished_run, tmp_path)
    first = _losses(out)
    assert _main(out, *RESUMABLE_RUN, "steps=6", "log_every=3", "eval_batches=2", "keep_checkpoints=3",
                 "mesh_data=2") == 0
    err = capsys.readouterr().err
    assert f"resuming tiny_charlm from step 4 ({out / 'checkpoints'}); steps 4 -> 6" in err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["resumed_from"], summary["devices"]) == (6, 4, 2)
    losses = _losses(out)
    assert len(losses) == 6 and losses[:4] == first
    meta = _manager(out).restore(6, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    assert (meta["steps"], meta["mesh_data"], meta["out_dir"]) == (6, 2, str(out))


def test_a_finished_run_is_left_as_it_is(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path)
    summary, metrics = (out / "summary.json").read_bytes(), (out / "metrics.jsonl").read_bytes()
    assert _main(out, *RESUMABLE_RUN, "eval_batches=3") == 0
    assert "tiny_charlm: already finished (4 steps" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == summary and (out / "metrics.jsonl").read_bytes() == metrics
    # Fewer steps than the checkpoint holds: refused, not reported as a 3-step run.
    assert _main(out, *RESUMABLE_RUN[1:], "steps=3") == 1
    assert "holds a checkpoint at step 4, past steps=3" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == summary


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(finished_run, tmp_path, capsys, how):
    out = _copy(finished_run, tmp_path)
    (out / "summary.json").unlink()  # else the rerun is "already finished" before reading anything
    _damage(out, 4, how)
    cfg = _cfg("tiny_charlm", tmp_path, *RESUMABLE_RUN, f"out_dir={out}")
    summary = train.run(cfg, quiet=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"warning: checkpoint step 4 in {out / 'checkpoints'} cannot be read (")
    assert err[0].endswith("; trying step 2"), err
    assert summary["resumed_from"] == 2
    np.testing.assert_allclose(_losses(out), _losses(finished_run), rtol=1e-6)
    assert sorted(_manager(out).all_steps()) == [2, 4]  # the damaged 4 was replaced by a good one
    # With every checkpoint damaged, one line says none can be read and how to start fresh.
    for step in (2, 4):
        _damage(out, step, how)
    (out / "summary.json").unlink()
    assert _main(out, *RESUMABLE_RUN) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: no checkpoint in {out / 'checkpoints'} can be read (steps 4, 2); "
                       f"use a new out_dir, or delete {out} to start fresh")


def test_restoring_into_another_shape_names_the_parameter(finished_run):
    """The config matches, the model does not (as when the model's code changed): the shapes stored
    in the checkpoint are compared before anything is restored."""
    import jax.numpy as jnp
    from flax import nnx

    from experiments.model import Model

    cfg = _cfg("tiny_charlm", finished_run.parent, *RESUMABLE_RUN, f"out_dir={finished_run}")
    wider = config.override(cfg, ["width=48"])
    _, params, _ = nnx.split(Model(wider, tasks.get("charlm"), rngs=nnx.Rngs(0)), nnx.Param, ...)
    state = {"params": params, "opt": train.optimizer(wider).init(params), "step": jnp.zeros((), jnp.int32)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    with pytest.raises(train.TrainingError) as err:
        train.restore_newest_intact(_manager(finished_run), abstract, cfg, warn=pytest.fail)
    assert str(err.value).startswith(
        f"checkpoint step 4 in {finished_run / 'checkpoints'} does not fit this model: "
        "params.blocks.0.attention.key.kernel has shape (32, 2, 16) in the checkpoint and shape (48, 2, 24) "
        "in the model"), err.value


def test_a_failed_save_stops_the_run_at_its_step(tmp_path, capsys, monkeypatch):
    """A full disk: the save of step 4 raises OSError; the run says so in one line, exits 1 and
    keeps step 2."""
    save = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    out = tmp_path / "run"
    assert _main(out, "steps=6", "checkpoint_every=2") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: saving checkpoint step 4 in {out / 'checkpoints'} failed (OSError: [Errno 28] "
                   "No space left on device); the last checkpoint is step 2")
    assert _manager(out).all_steps() == [2]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> dict:
    """An uninterrupted 8-step run, checkpoints every 2 steps (the newest 2 kept)."""
    out = tmp_path_factory.mktemp("straight")
    cfg = _cfg("tiny_charlm", out, "steps=8", "checkpoint_every=2", "keep_checkpoints=2")
    return train.run(cfg, quiet=True)


@pytest.mark.slow  # two child processes (JAX start-up and compile each) and three resumes: ~30-40 s
def test_interrupted_runs_resume_to_the_same_losses(straight_run, tmp_path):
    """A child process trains the run and, when it asks for a batch chosen at random (seeded), is
    SIGKILLed or sent SIGINT (whatever the machine's speed, the interruption lands mid-run); a copy
    of the SIGKILLed run also has its newest checkpoint truncated. Each resumes to the losses and
    validation loss of the uninterrupted run."""
    rng = random.Random(17)
    common = ["steps=8", "checkpoint_every=2", "keep_checkpoints=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def interrupted(kind: str, at: int):
        out = tmp_path / kind
        script = textwrap.dedent(f"""
            import os, signal, sys
            from experiments import tasks, train
            batch = tasks.Task.train_batch
            def interrupting(self, cfg, step):
                if step == {at}:
                    os.kill(os.getpid(), signal.{kind.upper()})
                return batch(self, cfg, step)
            tasks.Task.train_batch = interrupting
            sys.exit(train.main(["--config", {str(ROOT / 'experiments/configs/tiny_charlm.py')!r},
                                 "--override", *{[*TINY, *common, f'out_dir={out}']!r}]))
        """)
        proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                              timeout=300)
        return out, proc.returncode, proc.stderr.decode()

    def resumes_straight(out, resumed_from):
        resumed = train.run(_cfg("tiny_charlm", tmp_path, *common, f"out_dir={out}"), quiet=True)
        assert resumed["resumed_from"] == resumed_from
        np.testing.assert_allclose(_losses(out), _losses(straight_run["out_dir"]), rtol=1e-6)
        assert resumed["valid_loss"] == pytest.approx(straight_run["valid_loss"], rel=1e-6)

    # SIGKILL when batch `at` is asked for: steps 1..at are done and every checkpoint up to `at` saved.
    at = rng.randint(5, 7)
    killed, rc, err = interrupted("sigkill", at)
    assert rc == -9, err[-2000:]
    assert len(_losses(killed)) < 8
    truncated = Path(shutil.copytree(killed, tmp_path / "truncated"))
    resumes_straight(killed, at // 2 * 2)
    # The same run with its newest checkpoint truncated falls back to the one before.
    _damage(truncated, at // 2 * 2, "truncate")
    resumes_straight(truncated, at // 2 * 2 - 2)

    # SIGINT: the step in progress finishes (and is saved if due), then one line and exit 130.
    at = rng.randint(2, 7)
    stopped, rc, err = interrupted("sigint", at)
    last = (at + 1) // 2 * 2
    assert rc == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"interrupted: stopped at step {at + 1}; rerun the same command "
                                            f"to resume from step {last}"), err[-2000:]
    assert "Traceback" not in err
    resumes_straight(stopped, last)


def test_sharded_meshes_match_single_device(tmp_path):
    """8 simulated devices: data x fsdp (parameters sharded) and data x context (ring attention
    through attnjax.parallel.shard_op) give the single-device losses."""
    single = train.run(_cfg("tiny_charlm", tmp_path / "one", "steps=3"), quiet=True)
    for mesh in (["mesh_data=2", "mesh_fsdp=4"], ["mesh_data=2", "mesh_context=4"], ["mesh_fsdp=4", "mesh_tensor=2"]):
        cfg = _cfg("tiny_charlm", tmp_path / "-".join(mesh), "steps=3", *mesh)
        sharded = train.run(cfg, quiet=True)
        assert sharded["devices"] == 8
        np.testing.assert_allclose(_losses(sharded["out_dir"]), _losses(single["out_dir"]), rtol=2e-5,
                                   err_msg=str(mesh))


def test_every_variant_builds_for_the_tasks_it_fits():
    """Each registered variant builds a model and traces its forward pass (shapes only, no
    compile) on every task it declares it fits; a misfit is refused by name."""
    from flax import nnx

    from experiments import variants
    from experiments.model import Model

    fitted = 0
    for name, variant in variants.VARIANTS.items():
        for t in ("charlm", "digits"):
            cfg = config.override(config.Config(), [f"task={t}", f"variant={name}", "layers=2", "width=16",
                                                    "heads=2", "seq_len=16", "batch_size=2"])
            task = tasks.get(t, cfg)
            try:
                variant.check_task(task, cfg)
            except ValueError as e:
                assert repr(name) in str(e)
                continue
            model = Model(cfg, task, rngs=nnx.Rngs(0))
            graphdef, state = nnx.split(model)
            inputs = task.train_batch(cfg, 0)["inputs"]
            logits, aux = jax.eval_shape(lambda s: nnx.merge(graphdef, s)(inputs), state)
            want = (2, 16, task.num_outputs) if task.per_token else (2, task.num_outputs)
            assert logits.shape == want and aux.shape == (), name
            fitted += 1
    # every variant fits the tasks its flags allow (one-sided ones: lightning, agent, maxvit, sab, isab)
    assert fitted == sum(int(v.causal) + int(v.bidirectional) for v in variants.VARIANTS.values())
