"""The README demo: a tiny character-level language model on the Python standard library's source.

    python -m experiments.train --config tiny_charlm

2 layers, width 64, sequence 128, 300 steps of batch 16 (about 0.6M training bytes seen) with
softmax attention; about a minute on a 2-core CPU including compilation. Prints the validation
loss (nats per byte and bits per byte); writes runs/tiny_charlm/{metrics.jsonl,curves.png}.
Try ``--override variant=linear`` (or sigmoid, lightning, neighborhood, moh).
"""

from ..config import Config


def config() -> Config:
    return Config(
        name="tiny_charlm", task="charlm", variant="softmax", layers=2, width=64, heads=4,
        seq_len=128, batch_size=16, steps=300, lr=3e-3, warmup=30, eval_every=100, eval_batches=4,
        log_every=20, checkpoint_every=100, out_dir="runs/tiny_charlm", task_options={"max_bytes": 1 << 20},
    )
