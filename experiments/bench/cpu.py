"""``python -m experiments.bench.cpu <suite> [--quick]``: a suite's CPU benchmark."""

from .common import main

if __name__ == "__main__":
    main("cpu")
