"""Experiment configuration: one dataclass, one ``config()`` per file, ``--override key=value``.

A config file (``experiments/configs/<name>.py``) defines ``config() -> Config``; its docstring says
how to run it and what it costs (big_vision's convention). Overrides are parsed by the field's
type: ``steps=50``, ``lr=1e-3``, ``implementation=none``, ``variant_options={'window': 9}``.
Everything is checked by :func:`validate` before anything is compiled. A run that resumes from a
checkpoint may change only the keys in :data:`RESUMABLE` (:func:`resume_conflicts` says which
others differ).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import typing
from pathlib import Path

MESH_AXES = ("data", "fsdp", "tensor", "context")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of a run. Attention ``variant`` and its ``implementation`` are separate keys."""

    name: str = "run"
    task: str = "charlm"                    # charlm | mqar | digits (experiments.tasks.TASKS)
    variant: str = "softmax"                # any name in experiments.variants.VARIANTS
    implementation: str | None = None       # the ops' implementation= ("xla", "reference", "pallas", None)
    variant_options: dict = dataclasses.field(default_factory=dict)  # extra keyword arguments of the variant
    # model
    layers: int = 2
    width: int = 64
    heads: int = 4
    mlp_ratio: float = 4.0
    # data
    seq_len: int = 128
    batch_size: int = 16
    task_options: dict = dataclasses.field(default_factory=dict)     # e.g. {"max_bytes": 1 << 20}
    seed: int = 0
    # optimisation
    steps: int = 200
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_weight: float = 0.01                # weight of auxiliary losses (MoH load balance)
    # evaluation, logging, checkpoints
    eval_every: int = 100                   # also evaluated at the last step
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_every: int = 100             # 0: no checkpoints (a checkpoint already there is still resumed)
    keep_checkpoints: int = 2
    out_dir: str = "runs/run"
    plot: bool = True
    tensorboard: bool = False               # also write metrics as TensorBoard events (out_dir/tensorboard)
    sample: int = 160                       # bytes of text printed at the end of a charlm run (0: none)
    # device mesh: the product of the four sizes must divide the number of devices
    mesh_data: int = 1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    mesh_context: int = 1

    @property
    def mesh_shape(self) -> dict[str, int]:
        return {a: getattr(self, f"mesh_{a}") for a in MESH_AXES}


RESUMABLE = frozenset({
    # labels and outputs
    "name", "out_dir", "plot", "tensorboard", "sample",
    # how long to train: more steps continue the run (the learning-rate schedule then spans the new
    # `steps` from the resumed step on); fewer than the checkpoint's step is refused by train.run
    "steps",
    # what is measured and when, and when state is saved
    "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
    # how the same model is computed and placed: the op's code path and the device mesh
    "implementation", *(f"mesh_{a}" for a in MESH_AXES),
})
"""The config keys that may differ between a run and the checkpoint it resumes from. Every other key
changes the model (``variant``, ``variant_options``, ``layers``, ``width``, ``heads``,
``mlp_ratio``), the data (``task``, ``task_options``, ``seq_len``, ``batch_size``, ``seed``) or the
optimizer (``lr``, ``warmup``, ``weight_decay``, ``grad_clip``, ``aux_weight``), so a resumed run
would report a result that is partly another run's; :func:`resume_conflicts` refuses those."""


def as_json(cfg: Config) -> dict:
    """``cfg`` as the JSON object stored with each checkpoint (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def resume_conflicts(saved: dict, cfg: Config) -> list[str]:
    """``"key: old -> new"`` for each key outside :data:`RESUMABLE` where ``cfg`` differs from the
    config ``saved`` with a checkpoint (:func:`as_json`); empty when ``cfg`` may resume it. A key
    missing from ``saved`` (added to :class:`Config` after the checkpoint was written) counts as
    its default."""
    now = as_json(cfg)
    defaults = as_json(Config())
    return [f"{key}: {saved.get(key, defaults[key])!r} -> {value!r}" for key, value in now.items()
            if key not in RESUMABLE and saved.get(key, defaults[key]) != value]


CONFIGS = Path(__file__).resolve().parent / "configs"
"""The named configs (``experiments/configs/<name>.py``; inside a wheel ``attnjax/experiments/configs``)."""


def names() -> list[str]:
    """The names ``--config`` accepts besides a path: ``["charlm", "digits", "mqar", "tiny_charlm"]``."""
    return sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem != "__init__")


def load(config: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Runs ``config()`` from a named config (``"tiny_charlm"``, see :func:`names`) or from the
    file at a path, and applies ``key=value`` overrides."""
    module, where = _config_module(config)
    if not callable(getattr(module, "config", None)):
        raise ValueError(f"config {where} must define config() returning an experiments.config.Config")
    cfg = module.config()
    if not isinstance(cfg, Config):
        raise TypeError(
            f"config() in {where} must return an experiments.config.Config; got {type(cfg).__name__}"
        )
    return override(cfg, overrides)


def _config_module(config: str | Path):
    """The module of a config and how to name it in errors. A named config (or a path to one) is
    imported as the package's module, so it can import :class:`Config` relatively wherever the
    package is installed; any other file is run from its path."""
    text = str(config)
    if "/" not in text and "\\" not in text and not text.endswith(".py"):
        if text not in names():
            raise ValueError(f"unknown config {text!r}; named configs: {', '.join(names())} "
                             "(or give a path to a file defining config())")
        return importlib.import_module(f"{__package__}.configs.{text}"), repr(text)
    path = Path(config)
    if not path.is_file():
        raise ValueError(f"config file {text!r} does not exist")
    if path.resolve().parent == CONFIGS and path.stem != "__init__":
        return importlib.import_module(f"{__package__}.configs.{path.stem}"), repr(text)
    spec = importlib.util.spec_from_file_location(f"_attnjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, f"file {text!r}"


def override(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """``cfg`` with each ``key=value`` applied, the value parsed by the field's type."""
    hints = typing.get_type_hints(Config)
    changes = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        if key not in hints:
            raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(sorted(hints))}")
        changes[key] = parse(key, text.strip(), hints[key])
    return dataclasses.replace(cfg, **changes)


def parse(key: str, text: str, kind):
    """``text`` as a value of config key ``key`` of type ``kind`` (``none`` for an optional key)."""
    optional = type(None) in typing.get_args(kind)
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if base in (int, float, str):
            return base(text)
        value = ast.literal_eval(text)
        if not isinstance(value, base):
            raise ValueError(text)
        return value
    except (ValueError, SyntaxError):
        raise ValueError(f"override {key}={text!r}: expected a {getattr(base, '__name__', base)}") from None


def validate(cfg: Config, device_count: int) -> None:
    """Raises ``ValueError`` for a config that cannot run: cheap checks, before any compiling."""
    from . import tasks, variants

    task = tasks.get(cfg.task, cfg)
    variant = variants.get(cfg.variant)
    variant.check_task(task, cfg)
    for key in ("layers", "width", "heads", "seq_len", "batch_size", "steps", "eval_batches", "log_every",
                "eval_every", "keep_checkpoints", *(f"mesh_{a}" for a in MESH_AXES)):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1; got {getattr(cfg, key)}")
    # `not x > 0` rather than `x <= 0`, so that NaN is refused too
    for key, why in (("lr", "the peak learning rate"), ("mlp_ratio", "the MLP's width over the model's"),
                     ("grad_clip", "the largest gradient norm; inf: no clipping")):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"{key} must be > 0 ({why}); got {getattr(cfg, key)}")
    for key, why in (("checkpoint_every", "0: no checkpoints"), ("warmup", "steps of linear warmup"),
                     ("weight_decay", "AdamW's decoupled decay"),
                     ("aux_weight", "weight of auxiliary losses")):
        if not getattr(cfg, key) >= 0:
            raise ValueError(f"{key} must be >= 0 ({why}); got {getattr(cfg, key)}")
    task.check(cfg)
    if cfg.width % cfg.heads:
        raise ValueError(f"width={cfg.width} must be divisible by heads={cfg.heads}")
    n = 1
    for size in cfg.mesh_shape.values():
        n *= size
    mesh = " x ".join(f"{a}={s}" for a, s in cfg.mesh_shape.items())
    if n > device_count or device_count % n:
        raise ValueError(
            f"the mesh {mesh} has {n} devices, which does not divide the {device_count} available"
        )
    batch_shards = cfg.mesh_data * cfg.mesh_fsdp
    if cfg.batch_size % batch_shards:
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by mesh_data * mesh_fsdp = {batch_shards}"
        )
    if task.seq_len(cfg) % cfg.mesh_context:
        raise ValueError(
            f"sequence length {task.seq_len(cfg)} is not divisible by mesh_context={cfg.mesh_context}"
        )
    if cfg.heads % cfg.mesh_tensor:
        raise ValueError(f"heads={cfg.heads} is not divisible by mesh_tensor={cfg.mesh_tensor}")
