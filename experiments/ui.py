"""What a run shows and leaves behind: a progress bar (tqdm), JSONL metrics, optional TensorBoard
event files, a PNG of the curves, and the list of files written."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class ProgressBar:
    """tqdm's bar with rate, elapsed time and ETA, and the latest metrics after it:
    ``42%|####      | 126/300 [00:21<00:29, 5.9step/s, loss 2.314 | 45.1k tok/s]``. A resumed run
    starts at its step."""

    def __init__(self, total: int, *, initial: int = 0, stream=None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", file=stream or sys.stderr,
                        dynamic_ncols=True, mininterval=0.5, smoothing=0.1)

    def update(self, step: int, **values) -> None:
        self.bar.set_postfix_str(" ".join(_fmt(k, v) for k, v in values.items() if v is not None), refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _fmt(key: str, value) -> str:
    if key == "tokens_per_s":
        return f"| {value / 1e3:.1f}k tok/s"
    return f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"


class MetricsLog:
    """Appends one JSON object per line (strict JSON: a NaN or infinite value is written as
    ``null``). On resume, rows past the restored step are dropped (they were written after the
    last checkpoint and will be recomputed)."""

    def __init__(self, path: Path, *, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_jsonl(path) if resume_step is not None else []
        kept = [r for r in rows if r.get("step", 0) <= (resume_step or 0)]
        with path.open("w") as f:
            for r in kept:
                f.write(dumps(r) + "\n")

    def write(self, rows: list[dict]) -> None:
        with self.path.open("a") as f:
            for r in rows:
                f.write(dumps(r) + "\n")


class TensorBoard:
    """Every numeric metric of each logged row as a scalar at its step, in TensorBoard's event files
    under ``directory`` (``tensorboard --logdir <out_dir>/tensorboard``), through tensorboardX."""

    def __init__(self, directory: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(directory))

    def write(self, rows: list[dict]) -> None:
        for r in rows:
            for key, value in r.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, r["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def written(out: Path) -> list[str]:
    """``out``'s files and folders (a folder of many files, like a checkpoint, is one entry), each
    with its size: what the end of a run lists."""
    lines = []
    for path in sorted(out.iterdir()):
        if path.is_dir():
            files = [f for f in path.rglob("*") if f.is_file()]
            lines.append(f"  {path}/  ({len(files)} files, {_size(sum(f.stat().st_size for f in files))})")
        else:
            lines.append(f"  {path}  ({_size(path.stat().st_size)})")
    return lines


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def dumps(value, **kwargs) -> str:
    """``json.dumps`` that writes NaN and infinities as ``null`` (Python's bare ``NaN`` is not JSON)."""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(rows: list[dict], path: Path, title: str) -> Path:
    """Training loss per step and validation loss per evaluation, to a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    valid = [(r["step"], r["valid_loss"]) for r in rows if r.get("valid_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), lw=1, label="train loss")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def clock() -> float:
    return time.perf_counter()


__all__ = ["ProgressBar", "MetricsLog", "TensorBoard", "written", "dumps", "read_jsonl", "plot_curves", "duration", "clock"]
