"""experiments.train: each task trains, bad configs fail early, SIGKILL + resume replays the same
losses, and sharded meshes (data x fsdp, data x context) reproduce the single-device losses."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from experiments import config, tasks, train, ui

ROOT = Path(__file__).resolve().parents[1]
TINY = ["layers=2", "width=32", "heads=2", "seq_len=64", "batch_size=8", "eval_batches=1", "warmup=1",
        "log_every=2", "eval_every=100", "checkpoint_every=0", "plot=false"]


def _cfg(name: str, tmp_path, *overrides) -> config.Config:
    return config.load(ROOT / "experiments" / "configs" / f"{name}.py",
                       [*TINY, f"out_dir={tmp_path / name}", *overrides])


def _losses(out_dir) -> list[float]:
    return [r["loss"] for r in ui.read_jsonl(Path(out_dir) / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("name, variant",
                         [("tiny_charlm", "softmax"), ("mqar", "linear"), ("digits", "agent")])
def test_each_task_trains(tmp_path, name, variant):
    cfg = _cfg(name, tmp_path, "steps=4", f"variant={variant}", "plot=true", "lr=1e-2")
    summary = train.run(cfg, quiet=True)
    losses = _losses(cfg.out_dir)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert min(losses[1:]) < losses[0], losses  # a step at lr 1e-2 already lowers the loss
    assert math.isfinite(summary["valid_loss"]) and summary["tokens_per_s"] > 0
    assert (Path(cfg.out_dir) / "curves.png").stat().st_size > 0
    assert summary["variant"] == variant and summary["task"] == cfg.task


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


def test_resume_after_sigkill_replays_the_same_losses(tmp_path):
    common = ["steps=8", "checkpoint_every=2", "keep_checkpoints=2"]
    straight = train.run(_cfg("tiny_charlm", tmp_path / "straight", *common), quiet=True)
    killed = _cfg("tiny_charlm", tmp_path / "killed", *common)
    # A child process trains the same run and SIGKILLs itself when it asks for batch 5, so the kill
    # lands mid-run whatever the machine's speed (an async checkpoint may be half written).
    script = textwrap.dedent(f"""
        import os, signal
        from experiments import config, tasks, train
        batch = tasks.Task.train_batch
        def dying(self, cfg, step):
            if step == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return batch(self, cfg, step)
        tasks.Task.train_batch = dying
        cfg = config.load({str(ROOT / 'experiments/configs/tiny_charlm.py')!r},
                          {[*TINY, *common, f'out_dir={killed.out_dir}']!r})
        train.run(cfg, quiet=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert len(_losses(killed.out_dir)) < 8
    resumed = train.run(killed, quiet=True)
    assert resumed["resumed_from"] in (2, 4)  # 4 unless the kill caught its async write
    np.testing.assert_allclose(_losses(killed.out_dir), _losses(straight["out_dir"]), rtol=1e-6)
    assert resumed["valid_loss"] == pytest.approx(straight["valid_loss"], rel=1e-6)


def test_sharded_meshes_match_single_device(tmp_path):
    """8 simulated devices: data x fsdp (parameters sharded) and data x context (ring attention
    through attnjax.parallel.shard_op) give the single-device losses."""
    single = train.run(_cfg("tiny_charlm", tmp_path / "one", "steps=3"), quiet=True)
    for mesh in (["mesh_data=2", "mesh_fsdp=4"], ["mesh_data=2", "mesh_context=4"]):
        cfg = _cfg("tiny_charlm", tmp_path / "-".join(mesh), "steps=3", *mesh)
        sharded = train.run(cfg, quiet=True)
        assert sharded["devices"] == 8
        np.testing.assert_allclose(_losses(sharded["out_dir"]), _losses(single["out_dir"]), rtol=2e-5,
                                   err_msg=str(mesh))


def test_every_variant_builds_for_the_tasks_it_fits():
    """Each registered variant builds a model and traces its forward pass (shapes only, no
    compile) on every task it declares it fits; a misfit is refused by name."""
    import jax
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
    assert fitted >= 2 * len(variants.VARIANTS) - 4  # only lightning, agent, maxvit are one-sided
