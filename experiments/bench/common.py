"""Benchmark plumbing: timing, peak memory in a subprocess, and result files.

Every result file names the machine, the library versions and the exact command, so numbers
can be reproduced and compared only with numbers from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


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


def save(suite: str, payload: dict, args) -> Path:
    """Writes the result record (payload plus environment, date and command) to ``args.out`` if
    given, else to ``benchmarks/results/<suite>[-quick]-<backend>-<date>.json``; prints the
    payload's summary and the path, and returns the path."""
    env = environment()
    record = {
        "suite": suite,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", *_command()]),
        "environment": env,
        **payload,
    }
    if args.out:
        path = Path(args.out)
    else:
        RESULTS.mkdir(parents=True, exist_ok=True)
        quick = "-quick" if args.quick else ""
        path = RESULTS / f"{suite}{quick}-{env['backend']}-{record['date'][:10]}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(payload.get("summary"), indent=2))
    print(f"wrote {path}")
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
