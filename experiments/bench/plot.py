"""``python -m experiments.bench.plot benchmarks/results/<suite>-<backend>-<date>.json ...``: draws
(again) the log-log time and memory plot beside each result file (:func:`common.plot_scaling`;
every suite run already writes its own)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import common


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="result JSON files written by a suite")
    args = parser.parse_args(argv)
    for path in args.results:
        record = json.loads(path.read_text())
        suites = record.get("suites") or {record.get("suite", path.stem): record}
        for name, part in suites.items():
            target = path.with_suffix(".png") if len(suites) == 1 else path.with_name(f"{path.stem}-{name}.png")
            print(f"wrote {target}" if common.plot_scaling({**record, **part, "suite": name}, target)
                  else f"{path}: no rows with a length and a time to plot")


if __name__ == "__main__":
    main()
