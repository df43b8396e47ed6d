"""Compare attention variants on the tasks under one budget (in the spirit of CAB, "CAB: Comprehensive
Attention Benchmarking on Long Sequence Modeling", Zhang et al. 2023: same model, same steps,
same data for every variant).

    python -m experiments.compare                      # ~10 minutes on a 2-core CPU
    python -m experiments.compare --variants softmax linear --tasks mqar --steps 50

Each (variant, task) pair the variant can serve is trained from its config file
(``experiments/configs/{tiny_charlm,mqar,digits}.py``) for the same number of steps; the result
is a JSON record, a markdown table and a PNG (quality: final validation loss; speed: training
tokens/s after compilation) under ``benchmarks/results/compare-<backend>-<date>.*``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from . import config, tasks, train, variants
from .bench import common

CONFIGS = Path(__file__).resolve().parent / "configs"
TASK_CONFIGS = {"charlm": "tiny_charlm", "mqar": "mqar", "digits": "digits"}
DEFAULT_VARIANTS = ("softmax", "sigmoid", "linear", "lightning", "agent")
# Steps per task: one budget for every variant (small enough for a CPU; rank, not convergence).
STEPS = {"charlm": 150, "mqar": 200, "digits": 150}


def grid(variant_names, task_names):
    """The (variant, task) pairs where the variant fits the task (causal LM vs bidirectional)."""
    for t in task_names:
        task = tasks.get(t)
        for v in variant_names:
            variant = variants.get(v)
            if (task.causal and variant.causal) or (not task.causal and variant.bidirectional):
                yield v, t


def run_grid(variant_names, task_names, *, steps: int | None, out_dir: Path, extra=()) -> list[dict]:
    rows = []
    pairs = list(grid(variant_names, task_names))
    for i, (v, t) in enumerate(pairs):
        n = steps or STEPS[t]
        cfg = config.load(CONFIGS / f"{TASK_CONFIGS[t]}.py", [
            f"variant={v}", f"steps={n}", f"eval_every={n}", f"warmup={max(1, n // 10)}",
            "checkpoint_every=0", "plot=false", f"out_dir={out_dir / f'{t}-{v}'}", *extra,
        ])
        print(f"[{i + 1}/{len(pairs)}] {t} / {v}: {n} steps", flush=True)
        s = train.run(cfg, quiet=True)
        row = {k: s[k] for k in ("task", "variant", "steps", "valid_loss", "metric", "valid_metric",
                                 "tokens_per_s", "parameters", "seconds")}
        row["model"] = f"{cfg.layers} layers, width {cfg.width}, {cfg.heads} heads, batch {cfg.batch_size}"
        rows.append(row)
        print("   " + train.one_line(s), flush=True)
    return rows


def markdown(rows: list[dict], record: dict) -> str:
    env = record["environment"]
    models = "; ".join(sorted({f"{r['task']}: {r['model']}" for r in rows}))
    lines = [
        f"# Attention variants under one budget ({record['date'][:10]})", "",
        f"`{record['command']}` on {env['cpu']} ({env['cores']} cores, backend {env['backend']}, "
        f"jax {env['versions']['jax']}). Same model, data and steps for every variant of a task "
        f"({models}); quality is the final validation loss (nats; lower is better) and the "
        "task's metric; speed is training tokens/s after compilation. Small CPU budgets rank the "
        "variants early in training; they are not converged results.", "",
        "| task | variant | steps | valid loss | metric | tokens/s | parameters |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        speed = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "n/a"
        lines.append(f"| {r['task']} | {r['variant']} | {r['steps']} | {r['valid_loss']:.4f} | "
                     f"{r['metric']} {r['valid_metric']:.3f} | {speed} | {r['parameters']:,} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    task_names = list(dict.fromkeys(r["task"] for r in rows))
    variant_names = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(variant_names)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "valid_loss", "final validation loss (nats, lower is better)"),
                           (axes[1], "tokens_per_s", "training tokens/s (higher is better)")):
        for j, v in enumerate(variant_names):
            xs, ys = [], []
            for i, t in enumerate(task_names):
                hit = [r for r in rows if r["task"] == t and r["variant"] == v and r[key]]
                if hit:
                    xs.append(i + (j - (len(variant_names) - 1) / 2) * width)
                    ys.append(hit[0][key])
            ax.bar(xs, ys, width, label=v)
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
    parser.add_argument("--quick", action="store_true", help="a few steps of a tiny model: a smoke test")
    parser.add_argument("--out", default=None, help="write the JSON here (the .md and .png beside it)")
    args = parser.parse_args(argv)
    extra = list(args.override)
    if args.quick:
        args.steps = args.steps or 3
        extra += ["layers=1", "width=32", "heads=2", "seq_len=64", "batch_size=8", "eval_batches=1"]
    load_before = os.getloadavg()[0]  # a busy machine makes tokens/s noisy: say so in the record
    with tempfile.TemporaryDirectory(prefix="attnjax-compare-") as tmp:
        rows = run_grid(args.variants, args.tasks, steps=args.steps, out_dir=Path(tmp), extra=extra)
    summary = {f"{r['task']}/{r['variant']}": round(r["valid_loss"], 4) for r in rows}
    load = {"before": load_before, "after": os.getloadavg()[0]}
    path = common.save("compare", {"rows": rows, "summary": summary, "load_average": load}, args)


    record = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(rows, record))
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
