"""Compare attention variants on the tasks under one budget (in the spirit of CAB, "CAB: Comprehensive
Attention Benchmarking on Long Sequence Modeling", Zhang et al. 2023: same model, same steps,
same data for every variant).

    python -m experiments.compare                      # 3 seeds: ~30 minutes on a 2-core CPU
    python -m experiments.compare --variants softmax linear --tasks mqar --steps 50 --seeds 0 1

Each (variant, task) pair the variant can serve is trained from its config file
(``experiments/configs/{tiny_charlm,mqar,digits}.py``) for the same number of steps, once per
seed (the seed draws the initial parameters and the batches); the result is a JSON record (one
row per run, and the spread per pair), a markdown table (mean, standard deviation and range over
seeds) and a PNG (quality: final validation loss; speed: training tokens/s after compilation;
error bars: the seeds' range) under ``benchmarks/results/compare-<backend>-<date>.*``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from . import config, tasks, train, variants
from .bench import common

TASK_CONFIGS = {"charlm": "tiny_charlm", "mqar": "mqar", "digits": "digits"}
DEFAULT_VARIANTS = ("softmax", "sigmoid", "linear", "lightning", "agent")
# Steps per task: one budget for every variant (small enough for a CPU; rank, not convergence).
STEPS = {"charlm": 150, "mqar": 200, "digits": 150}
# zoo part 4: the set task, and ISAB in the default grid (it runs on digits and maxset)
TASK_CONFIGS["maxset"], STEPS["maxset"] = "maxset", 200
DEFAULT_VARIANTS += ("isab",)


def _set_pooling(variant: str, task: str) -> list[str]:
    """On the set task the Set Transformer variants pool by PMA; the others by the mean."""
    if task != "maxset":
        return []
    return ["variant_options={'pool': 'pma'}" if variant in ("sab", "isab") else "variant_options={}"]


def grid(variant_names, task_names):
    """The (variant, task) pairs where the variant fits the task (causal LM vs bidirectional)."""
    for t in task_names:
        task = tasks.get(t)
        for v in variant_names:
            variant = variants.get(v)
            if (task.causal and variant.causal) or (not task.causal and variant.bidirectional):
                yield v, t


def run_grid(variant_names, task_names, *, steps: int | None, out_dir: Path, extra=(),
             seeds=(0,)) -> list[dict]:
    rows = []
    runs = [(v, t, seed) for v, t in grid(variant_names, task_names) for seed in seeds]
    for i, (v, t, seed) in enumerate(runs):
        n = steps or STEPS[t]
        cfg = config.load(TASK_CONFIGS[t], [
            f"variant={v}", f"steps={n}", f"eval_every={n}", f"warmup={max(1, n // 10)}",
            "checkpoint_every=0", "plot=false", f"out_dir={out_dir / f'{t}-{v}-{seed}'}", *_set_pooling(v, t), *extra,
            f"seed={seed}",
        ])
        print(f"[{i + 1}/{len(runs)}] {t} / {v} / seed {seed}: {n} steps", flush=True)
        s = train.run(cfg, quiet=True)
        row = {k: s[k] for k in ("task", "variant", "steps", "valid_loss", "metric", "valid_metric",
                                 "tokens_per_s", "parameters", "seconds")}
        row["seed"] = seed
        row["model"] = f"{cfg.layers} layers, width {cfg.width}, {cfg.heads} heads, batch {cfg.batch_size}"
        rows.append(row)
        print("   " + train.one_line(s), flush=True)
    return rows


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def spread(rows: list[dict]) -> list[dict]:
    """Per (task, variant), over its seeds: mean, sample standard deviation, min and max of the
    validation loss, the task metric and tokens/s."""
    pairs = dict.fromkeys((r["task"], r["variant"]) for r in rows)
    out = []
    for t, v in pairs:
        mine = [r for r in rows if r["task"] == t and r["variant"] == v]
        out.append({"task": t, "variant": v, "steps": mine[0]["steps"], "metric": mine[0]["metric"],
                    "parameters": mine[0]["parameters"], "seeds": [r.get("seed") for r in mine],
                    **{key: _stats([r[key] for r in mine]) for key in ("valid_loss", "valid_metric", "tokens_per_s")}})
    return out


def markdown(rows: list[dict], record: dict) -> str:
    env = record["environment"]
    models = "; ".join(sorted({f"{r['task']}: {r['model']}" for r in rows}))
    git = record.get("git", {})
    commit = (git.get("commit") or "none")[:10] + (" with uncommitted changes" if git.get("dirty") else "")
    load = record.get("load_average", {})
    lines = [
        f"# Attention variants under one budget ({record['date'][:10]})", "",
        f"`{record['command']}` on {env['cpu']} ({env['cores']} cores, backend {env['backend']}, "
        f"jax {env['versions']['jax']}), commit {commit}, 1-minute load average "
        f"{load.get('start', ['?'])[0]} at the start and {load.get('end', ['?'])[0]} at the end. "
        f"Same model, data and steps for every variant of a task "
        f"({models}); quality is the final validation loss (nats; lower is better) and the "
        "task's metric; speed is training tokens/s after compilation. Each cell is the mean ± "
        "sample standard deviation over the seeds, then their range [min, max]: a difference "
        "smaller than the spread is not a ranking. Small CPU budgets rank the "
        "variants early in training; they are not converged results.", "",
        "| task | variant | steps | seeds | valid loss | metric | tokens/s | parameters |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]

    def cell(s: dict, fmt: str) -> str:
        if not s.get("n"):
            return "n/a"
        return f"{s['mean']:{fmt}} ± {s['std']:{fmt}} [{s['min']:{fmt}}, {s['max']:{fmt}}]"

    for r in spread(rows):
        lines.append(f"| {r['task']} | {r['variant']} | {r['steps']} | {len(r['seeds'])} | "
                     f"{cell(r['valid_loss'], '.4f')} | {r['metric']} {cell(r['valid_metric'], '.3f')} | "
                     f"{cell(r['tokens_per_s'], ',.0f')} | {r['parameters']:,} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    task_names = list(dict.fromkeys(r["task"] for r in rows))
    variant_names = list(dict.fromkeys(r["variant"] for r in rows))
    stats = {(r["task"], r["variant"]): r for r in spread(rows)}
    width = 0.8 / len(variant_names)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "valid_loss", "final validation loss (nats, lower is better)"),
                           (axes[1], "tokens_per_s", "training tokens/s (higher is better)")):
        for j, v in enumerate(variant_names):
            xs, ys, lo, hi = [], [], [], []
            for i, t in enumerate(task_names):
                s = stats.get((t, v), {}).get(key, {})
                if s.get("n"):
                    xs.append(i + (j - (len(variant_names) - 1) / 2) * width)
                    ys.append(s["mean"])
                    lo.append(s["mean"] - s["min"])
                    hi.append(s["max"] - s["mean"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=v)  # error bars: the seeds' range
        ax.set_xticks(np.arange(len(task_names)), task_names)
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        choices=list(variants.VARIANTS))
    parser.add_argument("--tasks", nargs="+", default=list(TASK_CONFIGS), choices=list(TASK_CONFIGS))
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per run (default: per task, see STEPS)")
    parser.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides applied to every run")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="seeds per pair (default 0 1 2; --quick: 0 1): the table shows their spread")
    parser.add_argument("--quick", action="store_true", help="a few steps of a tiny model: a smoke test")
    parser.add_argument("--out", default=None, help="write the JSON here (the .md and .png beside it)")
    args = parser.parse_args(argv)
    extra = list(args.override)
    if args.quick:
        args.steps = args.steps or 3
        extra += ["layers=1", "width=32", "heads=2", "seq_len=64", "batch_size=8", "eval_batches=1"]
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    with tempfile.TemporaryDirectory(prefix="attnjax-compare-") as tmp:
        rows = run_grid(args.variants, args.tasks, steps=args.steps, out_dir=Path(tmp), extra=extra,
                        seeds=seeds)
    pairs = spread(rows)
    summary = {f"{r['task']}/{r['variant']}": {"valid_loss_mean": round(r["valid_loss"]["mean"], 4),
                                               "valid_loss_std": round(r["valid_loss"]["std"], 4)}
               for r in pairs}
    # the record's load average (common.provenance) says how busy the machine was: tokens/s noise
    path = common.save("compare", {"seeds": seeds, "rows": rows, "spread": pairs, "summary": summary}, args,
                       plot=False)


    record = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(rows, record))
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
