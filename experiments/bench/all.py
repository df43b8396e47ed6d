"""Every GPU suite in one run and one JSON: the flash kernels (softmax, sigmoid) against cuDNN and
the xla path, lightning attention and neighborhood attention, each checked against the dense
reference before it is timed.

    python -m experiments.bench.gpu all             # on the GPU machine (under 8 minutes on an H200)
    python -m experiments.bench.gpu all --dry-run   # tiny sizes, interpret mode: runs on CPU (tests)

Writes ``benchmarks/results/all-gpu-<date>.json`` (``all-quick-cpu-...`` for a dry run).
"""

from __future__ import annotations

from . import common, flash, lightning, neighborhood

SUITES = {"flash": flash, "lightning": lightning, "neighborhood": neighborhood}


def gpu(args) -> None:
    payloads = {name: module.gpu_payload(args) for name, module in SUITES.items()}
    summary = {name: payload.get("summary") for name, payload in payloads.items()}
    common.save("all", {"suites": payloads, "summary": summary}, args)
