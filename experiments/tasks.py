"""The training tasks: all offline, all data written by others.

* ``charlm``: character (byte) level language modelling on the Python standard library's own
  source, split into train/validation by file;
* ``mqar``: multi-query associative recall ("Zoology: Measuring and Improving Recall in Efficient
  Language Models", Arora et al. 2023), the probe where linear attentions fall behind softmax;
* ``digits``: scikit-learn's bundled 8x8 handwritten digits, one token per pixel on a 2-D grid.

A batch is a dict of numpy arrays: ``inputs`` (``[B, T]`` int tokens, or ``[B, T, F]`` float
features), ``targets`` (``[B, T]`` per token, or ``[B]`` per example) and ``weights`` (same
shape as ``targets``; the loss and metric average over them). Training batch ``step`` is a pure
function of ``(seed, step)``, so a resumed run sees exactly the batches it would have seen;
validation batches are fixed.
"""

from __future__ import annotations

import dataclasses
import functools
import sysconfig
from pathlib import Path

import numpy as np

VALID_SEED = 1 << 20  # validation batches come from their own stream, whatever the seed


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


@dataclasses.dataclass(frozen=True)
class Task:
    """What the model needs to know about a task, and its batches."""

    name: str
    causal: bool                      # the model must not look ahead (language modelling)
    per_token: bool                   # targets per position (LM) or per example (classification)
    vocab_size: int | None            # token inputs, or None for float features
    input_features: int | None
    num_outputs: int
    metric: str                       # the name of the reported metric ("accuracy", "bits/byte")
    make_batch: object                # (cfg, rng, split) -> batch
    length: object                    # cfg -> sequence length
    grid_of: object = None            # cfg -> 2-D grid of the tokens, or None
    valid_set: object = None          # cfg -> list of batches (a fixed validation set), optional
    options: tuple[str, ...] = ()     # the keys of task_options it reads
    check_data: object = None         # cfg -> None; raises ValueError when the data would hold no example

    def check(self, cfg) -> None:
        """Raises ``ValueError`` for unknown ``task_options`` or options (with ``seq_len`` and
        ``batch_size``) that leave no training or validation example."""
        unknown = set(cfg.task_options) - set(self.options)
        if unknown:
            raise ValueError(f"task {self.name!r} takes task_options {list(self.options)}; "
                             f"got unknown {sorted(unknown)}")
        if self.check_data is not None:
            self.check_data(cfg)

    def seq_len(self, cfg) -> int:
        return self.length(cfg)

    def grid(self, cfg) -> tuple[int, int] | None:
        return None if self.grid_of is None else self.grid_of(cfg)

    def train_batch(self, cfg, step: int) -> dict:
        return self.make_batch(cfg, _rng(cfg.seed, step), "train")

    def valid_batches(self, cfg) -> list[dict]:
        if self.valid_set is not None:
            return self.valid_set(cfg)
        return [self.make_batch(cfg, _rng(VALID_SEED, i), "valid") for i in range(cfg.eval_batches)]


# -- character-level language modelling on the standard library's source -------------------------


@functools.lru_cache(maxsize=4)
def stdlib_corpus(max_bytes: int, valid_every: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``(train, valid)`` byte arrays: the sorted top-level ``.py`` files of the standard library,
    every ``valid_every``-th file held out for validation, train capped at ``max_bytes`` and
    validation at ``max_bytes // valid_every`` (at least 64 KiB)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if len(files) < valid_every:
        raise ValueError(
            f"found only {len(files)} .py files under {root}; the char-LM task needs the stdlib source"
        )
    caps = {"train": max_bytes, "valid": max(max_bytes // valid_every, 1 << 16)}
    parts: dict[str, list[bytes]] = {"train": [], "valid": []}
    sizes = dict.fromkeys(parts, 0)
    for i, path in enumerate(files):
        split = "valid" if i % valid_every == valid_every // 2 else "train"
        if sizes[split] < caps[split]:
            data = path.read_bytes()[: caps[split] - sizes[split]]
            parts[split].append(data)
            sizes[split] += len(data)
    return tuple(np.frombuffer(b"\n".join(parts[s]), np.uint8) for s in ("train", "valid"))


def _charlm_max_bytes(cfg) -> int:
    return int(cfg.task_options.get("max_bytes", 1 << 20))


def _charlm_check(cfg) -> None:
    """Each split must hold one window of ``seq_len + 1`` bytes with room to start it at random."""
    max_bytes = _charlm_max_bytes(cfg)
    if max_bytes < 1:
        raise ValueError(f"charlm: task_options['max_bytes'] must be >= 1; got {max_bytes}")
    for split, data in zip(("training", "validation"), stdlib_corpus(max_bytes)):
        if len(data) < cfg.seq_len + 2:
            raise ValueError(f"charlm: the {split} text has {len(data)} bytes, too few for a window of "
                             f"seq_len={cfg.seq_len} + 1; raise task_options['max_bytes'] (now {max_bytes}) "
                             f"or lower seq_len")


def _charlm_batch(cfg, rng, split):
    data = stdlib_corpus(_charlm_max_bytes(cfg))[split == "valid"]
    T = cfg.seq_len
    starts = rng.integers(0, len(data) - T - 1, size=cfg.batch_size)
    windows = np.stack([data[s : s + T + 1] for s in starts]).astype(np.int32)
    weights = np.ones((cfg.batch_size, T), np.float32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:], "weights": weights}


CHARLM = Task(
    name="charlm", causal=True, per_token=True, vocab_size=256, input_features=None, num_outputs=256,
    metric="bits/byte", make_batch=_charlm_batch, length=lambda cfg: cfg.seq_len,
    options=("max_bytes",), check_data=_charlm_check,
)


# -- multi-query associative recall ----------------------------------------------------------------


def _mqar_batch(cfg, rng, split):
    """Zoology's MQAR: ``k_1 v_1 ... k_n v_n`` then, at random places in the rest of the sequence,
    the keys again, each followed by its value; the model is scored on predicting those values
    (every other position is the filler token 0 and is not scored). Keys come from
    ``[1, V/2)``, values from ``[V/2, V)``."""
    _mqar_check(cfg)
    T, B = cfg.seq_len, cfg.batch_size
    V, n = _mqar_vocab(cfg), _mqar_pairs(cfg)
    slots = (T + 1 - 2 * n) // 2
    seq = np.zeros((B, T + 1), np.int32)
    scored = np.zeros((B, T + 1), bool)
    rows = np.arange(B)[:, None]
    keys = np.stack([rng.choice(np.arange(1, V // 2), n, replace=False) for _ in range(B)])
    values = rng.integers(V // 2, V, size=(B, n))
    seq[:, 0 : 2 * n : 2], seq[:, 1 : 2 * n : 2] = keys, values
    where = np.stack([np.sort(rng.choice(slots, n, replace=False)) for _ in range(B)]) * 2 + 2 * n
    order = np.stack([rng.permutation(n) for _ in range(B)])
    seq[rows, where], seq[rows, where + 1] = keys[rows, order], values[rows, order]
    scored[rows, where] = True  # the input at `where` is a key; its target (next token) is the value
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": scored[:, :-1].astype(np.float32)}


def _mqar_vocab(cfg) -> int:
    return int(cfg.task_options.get("vocab_size", 64))


def _mqar_pairs(cfg) -> int:
    return int(cfg.task_options.get("num_kv", 8))


def _mqar_check(cfg) -> None:
    """At least one pair (else nothing is scored), room for the pairs and their queries in
    ``seq_len``, and ``num_kv`` distinct keys in the vocabulary."""
    T, V, n = cfg.seq_len, _mqar_vocab(cfg), _mqar_pairs(cfg)
    if n < 1:
        raise ValueError(f"mqar: task_options['num_kv'] must be >= 1 (else nothing is scored); got {n}")
    if (T + 1 - 2 * n) // 2 < n or V // 2 - 1 < n:
        raise ValueError(f"mqar: num_kv={n} pairs need seq_len >= {4 * n} and vocab_size >= {2 * n + 2}; "
                         f"got seq_len={T}, vocab_size={V}")


MQAR = Task(
    name="mqar", causal=True, per_token=True, vocab_size=64, input_features=None, num_outputs=64,
    metric="accuracy", make_batch=_mqar_batch, length=lambda cfg: cfg.seq_len,
    options=("vocab_size", "num_kv"), check_data=_mqar_check,
)


# -- handwritten digits as an 8 x 8 grid of tokens ------------------------------------------------


@functools.lru_cache(maxsize=1)
def digits_split(valid_fraction: float = 0.2):
    """``((x_train, y_train), (x_valid, y_valid))``: scikit-learn's digits, pixels scaled to
    ``[0, 1]`` as ``[N, 64, 1]``, split by a fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits task needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(y))
    n_valid = int(len(y) * valid_fraction)
    valid, train = perm[:n_valid], perm[n_valid:]
    return (x[train], y[train]), (x[valid], y[valid])


def _digits_batch(cfg, rng, split):
    (x, y), _ = digits_split()
    idx = rng.choice(len(y), cfg.batch_size, replace=False)
    return {"inputs": x[idx], "targets": y[idx], "weights": np.ones(cfg.batch_size, np.float32)}


def _digits_check(cfg) -> None:
    """A training batch draws ``batch_size`` distinct images."""
    (_, y), _ = digits_split()
    if cfg.batch_size > len(y):
        raise ValueError(f"digits: batch_size={cfg.batch_size} is more than the {len(y)} training images")


def _digits_valid(cfg):
    """The whole validation split, padded to whole batches with weight-0 rows."""
    _, (x, y) = digits_split()
    B = cfg.batch_size
    pad = -len(y) % B
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    w = np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    return [{"inputs": x[i : i + B], "targets": y[i : i + B], "weights": w[i : i + B]}
            for i in range(0, len(y), B)]


DIGITS = Task(
    name="digits", causal=False, per_token=False, vocab_size=None, input_features=1, num_outputs=10,
    metric="accuracy", make_batch=_digits_batch, length=lambda cfg: 64, grid_of=lambda cfg: (8, 8),
    valid_set=_digits_valid, check_data=_digits_check,
)

TASKS = {t.name: t for t in (CHARLM, MQAR, DIGITS)}


def get(name: str, cfg=None) -> Task:
    """The task called ``name`` (MQAR's vocabulary comes from ``cfg.task_options``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    task = TASKS[name]
    if name == "mqar" and cfg is not None:
        V = _mqar_vocab(cfg)
        task = dataclasses.replace(task, vocab_size=V, num_outputs=V)
    return task


# -- a synthetic set task: the maximum of a set of digits (zoo part 4, Set Transformer) -----------


def _set_size(cfg) -> int:
    return int(cfg.task_options.get("set_size", 16))


def _maxset_batch(cfg, rng, split):
    """Sets of ``set_size`` digits 0..9 (features ``digit / 9``); the target is the set's maximum.
    The digits are drawn with a per-set upper bound so every maximum is about equally common."""
    B, n = cfg.batch_size, _set_size(cfg)
    top = rng.integers(0, 10, (B, 1))
    digits = rng.integers(0, top + 1, (B, n))
    digits[np.arange(B), rng.integers(0, n, B)] = top[:, 0]  # the maximum occurs
    return {"inputs": (digits[..., None] / 9.0).astype(np.float32), "targets": top[:, 0].astype(np.int32),
            "weights": np.ones(B, np.float32)}


def _maxset_check(cfg) -> None:
    if _set_size(cfg) < 1:
        raise ValueError(f"maxset: task_options['set_size'] must be >= 1; got {_set_size(cfg)}")


MAXSET = Task(
    name="maxset", causal=False, per_token=False, vocab_size=None, input_features=1, num_outputs=10,
    metric="accuracy", make_batch=_maxset_batch, length=_set_size, options=("set_size",),
    check_data=_maxset_check,
)
TASKS[MAXSET.name] = MAXSET
