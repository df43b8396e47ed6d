"""What a run shows and leaves behind: a progress bar, JSONL metrics, a PNG of the curves."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class ProgressBar:
    """``[#####.....] 120/200 loss 2.314 | 45.1k tok/s`` on one line (redrawn in a terminal,
    one line per update otherwise, so logs stay readable). Standard library only."""

    def __init__(self, total: int, *, width: int = 30, stream=None):
        self.total, self.width = total, width
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def update(self, step: int, **values) -> None:
        done = int(self.width * step / max(self.total, 1))
        text = " ".join(_fmt(k, v) for k, v in values.items() if v is not None)
        line = f"[{'#' * done}{'.' * (self.width - done)}] {step}/{self.total} {text}"
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


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


__all__ = ["ProgressBar", "MetricsLog", "dumps", "read_jsonl", "plot_curves", "duration", "clock"]
