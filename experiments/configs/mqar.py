"""Multi-query associative recall (Zoology), where linear attentions fall behind softmax.

    python -m experiments.train --config mqar --override seq_len=256 variant=linear

2 layers, width 64, 8 key-value pairs over a 64-token vocabulary, sequence 128 (try 64, 128, 256:
recall gets harder for fixed-state attentions as the sequence grows). 600 steps of batch 32;
a couple of minutes on a 2-core CPU. The metric is recall accuracy on the queried values.
"""

from ..config import Config


def config() -> Config:
    return Config(
        name="mqar", task="mqar", variant="softmax", layers=2, width=64, heads=4,
        seq_len=128, batch_size=32, steps=600, lr=3e-3, warmup=50, weight_decay=0.1, eval_every=200,
        eval_batches=8, log_every=20, checkpoint_every=200, out_dir="runs/mqar",
        task_options={"vocab_size": 64, "num_kv": 8},
    )
