"""``python -m experiments.bench.gpu <suite> [--quick]``: a suite's GPU benchmark."""

from experiments.bench.common import main

if __name__ == "__main__":
    main("gpu")
