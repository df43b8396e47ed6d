"""Handwritten digits (scikit-learn's 8x8 images) as a 2-D grid of 64 pixel tokens.

    python -m experiments.train --config digits --override variant=agent

For the variants that see structure: ``agent`` (a 4x4 grid of agents), ``neighborhood``
(3x3 windows on the grid), and every bidirectional variant (softmax, sigmoid, linear, moh).
2 layers, width 64, 400 steps of batch 32; under a minute on a 2-core CPU. The metric is
validation accuracy on a fixed 20% split (359 images).
"""

from ..config import Config


def config() -> Config:
    return Config(
        name="digits", task="digits", variant="softmax", layers=2, width=64, heads=4,
        batch_size=32, steps=400, lr=3e-3, warmup=40, eval_every=100, log_every=20, checkpoint_every=200,
        out_dir="runs/digits",
    )
