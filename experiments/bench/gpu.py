"""``python -m experiments.bench.gpu <suite> [--quick]``: a suite's GPU benchmark."""

from .common import main

if __name__ == "__main__":
    main("gpu")
