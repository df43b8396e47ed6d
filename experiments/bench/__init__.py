"""Benchmarks. ``python -m experiments.bench.cpu <suite>`` / ``python -m experiments.bench.gpu <suite>``
run ``experiments/bench/<suite>.py``'s ``cpu(args)`` / ``gpu(args)`` and write JSON to
``benchmarks/results/`` (see :mod:`experiments.bench.common`)."""
