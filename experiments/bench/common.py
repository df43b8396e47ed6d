"""Benchmark plumbing: timing, peak memory in a subprocess, and result files.

Every result file (:func:`save`, the one writer) names the machine, the library versions, the
exact command, the git commit (and whether the tree had uncommitted changes) and the load
average when the run started and ended, so numbers can be reproduced, trusted or discounted
(a loaded machine makes times noisy), and compared only with numbers from the same run. Beside
each JSON, :func:`plot_scaling` draws time and memory against length on log-log axes, one line
per implementation or peer, with a caption naming the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
# A checkout writes into its benchmarks/results; an installed wheel (no repository) into the
# current directory's benchmarks/results.
RESULTS = (_REPO if (_REPO / "pyproject.toml").exists() else Path.cwd()) / "benchmarks" / "results"
LOAD_AT_START = os.getloadavg()  # this module is imported as a run starts: its load before measuring


def environment() -> dict:
    import jax

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    for name in ("jaxlib", "flax", "torch", "natten", "fla"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken peers are simply not listed
            pass
    return {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "versions": versions,
    }


def time_fn(fn, *args, repeats: int = 5, min_time: float = 0.0) -> float:
    """Median seconds per call of ``fn(*args)`` after one warm-up (compile) call."""
    import jax

    jax.block_until_ready(fn(*args))
    samples = []
    while len(samples) < repeats or sum(samples) < min_time:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(module: str, *args: str, timeout: float = 1800) -> dict:
    """Runs ``python -m module --worker args...`` in a fresh process; returns its JSON line.

    One process per measurement keeps peak-memory readings independent of each other.
    """
    cmd = [sys.executable, "-m", module, "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(lines[-1])


def git_commit() -> dict:
    """``{"commit": sha, "dirty": bool}`` of the repository the benchmarks run from (``dirty``:
    tracked files differ from the commit); ``{"commit": None}`` outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def provenance() -> dict:
    """What every result file records besides the machine: command, commit and load average
    (1, 5 and 15-minute means of runnable processes, at the start and the end of the run)."""
    return {
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", *_command()]),
        "git": git_commit(),
        "load_average": {"start": [round(x, 2) for x in LOAD_AT_START],
                         "end": [round(x, 2) for x in os.getloadavg()]},
    }


def save(suite: str, payload: dict, args, *, plot: bool = True) -> Path:
    """Writes the result record (payload plus date, :func:`provenance` and environment) to
    ``args.out`` if given, else to ``benchmarks/results/<suite>[-quick]-<backend>-<date>.json``,
    and with ``plot`` its :func:`plot_scaling` figures beside it (``.png``; one per suite for a
    record of several); prints the payload's summary and the paths, and returns the JSON's path."""
    env = environment()
    record = {
        "suite": suite,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **provenance(),
        "environment": env,
        **payload,
    }
    if args.out:
        path = Path(args.out)
    else:
        RESULTS.mkdir(parents=True, exist_ok=True)
        quick = "-quick" if args.quick else ""
        path = RESULTS / f"{suite}{quick}-{env['backend']}-{record['date'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(payload.get("summary"), indent=2))
    print(f"wrote {path}")
    if plot:
        suites = record.get("suites") or {suite: record}
        for name, part in suites.items():
            target = path.with_suffix(".png") if len(suites) == 1 else path.with_name(f"{path.stem}-{name}.png")
            if plot_scaling({**record, **part, "suite": name}, target):
                print(f"wrote {target}")
    return path


LENGTH_KEYS = ("T", "tokens", "seq_len", "size", "kernel")
"""The x axis of a suite's plot: the first of these its rows have (``kernel`` for neighborhood
attention, whose suite varies the window at a fixed length)."""
TIME_KEYS = ("seconds", "forward_backward_s", "forward_s")
MEMORY_KEYS = ("peak_extra_bytes", "peak_bytes")
_MEASURED = re.compile(r"(seconds|_s|bytes|tflops|gflops|of_peak|per_token|error|reference|skipped)$")


def plot_scaling(record: dict, path: Path) -> Path | None:
    """Time and memory against length on log-log axes, one line per implementation (or peer,
    variant, head dim: every row key that is not measured and takes several values at one
    length), with a caption naming the machine, the date, the commit and the load. ``None`` (no
    file) when the rows have no length or no time."""
    rows = [r for r in record.get("rows", []) if isinstance(r, dict) and "error" not in r]
    x = next((k for k in LENGTH_KEYS if any(k in r for r in rows)), None)
    time_key = next((k for k in TIME_KEYS if any(k in r for r in rows)), None)
    if x is None or time_key is None:
        return None
    memory_key = next((k for k in MEMORY_KEYS if any(k in r for r in rows)), None)
    rows = [r for r in rows if isinstance(r.get(x), (int, float)) and isinstance(r.get(time_key), (int, float))]
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != x and not _MEASURED.search(k)]
    series_keys = [k for k in keys if any(len({repr(r.get(k)) for r in rows if r[x] == v}) > 1
                                          for v in {r[x] for r in rows})]
    lines: dict[str, list[dict]] = {}
    for r in rows:
        label = ", ".join(str(r.get(k)) if k in ("implementation", "variant") else f"{k}={r.get(k)}"
                          for k in series_keys) or record.get("suite", "")
        lines.setdefault(label, []).append(r)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(time_key, f"{time_key} (s)")] + ([(memory_key, "peak memory above inputs (bytes)")]
                                                 if memory_key else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name, points in lines.items():
            points = sorted((p[x], p[key]) for p in points if isinstance(p.get(key), (int, float)) and p[key] > 0)
            if points:
                ax.plot(*zip(*points), "o-", lw=1.2, ms=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if not memory_key:
        axes[0][0].set_title("memory: not measured by this suite", fontsize=8)
    env, git = record.get("environment", {}), record.get("git", {})
    commit = ((git.get("commit") or "none")[:10] + ("+changes" if git.get("dirty") else "")
              if git else "not recorded")
    load = record.get("load_average")
    load = f"{load['start'][0]} -> {load['end'][0]}" if isinstance(load, dict) and "start" in load else "not recorded"
    caption = (f"{record.get('suite')}: {env.get('cpu')} ({env.get('cores')} cores), backend "
               f"{env.get('backend')} ({env.get('device')}); {record.get('date', '')[:10]}; "
               f"commit {commit}; 1-minute load {load}")
    fig.text(0.5, 0.01, caption, ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _command() -> list[str]:
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return [spec.name if spec else sys.argv[0], *sys.argv[1:]]


def main(platform_name: str) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m experiments.bench.{platform_name}")
    parser.add_argument("suite", help="benchmark suite: a module of experiments.bench (e.g. attention)")
    parser.add_argument("--quick", "--dry-run", dest="quick", action="store_true",
                        help="tiny sizes, for a smoke test (on CPU the kernels run in interpret mode)")
    parser.add_argument("--out", default=None, help="write the JSON here instead of benchmarks/results/")
    args = parser.parse_args()
    try:
        module = importlib.import_module(f"{__package__}.{args.suite}")
    except ModuleNotFoundError:
        parser.error(f"unknown suite {args.suite!r}")
    entry = getattr(module, platform_name, None)
    if entry is None:
        parser.error(f"suite {args.suite!r} has no {platform_name} benchmark")
    entry(args)
