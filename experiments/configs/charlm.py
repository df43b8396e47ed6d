"""A larger character-level language model on the Python standard library's source.

    python -m experiments.train --config charlm --override variant=lightning

4 layers, width 256, sequence 512, batch 32, 5000 steps over 8 MiB of stdlib ``.py`` files
(every tenth file held out). Meant for an accelerator (minutes on one GPU); hours on a laptop CPU.
"""

from ..config import Config


def config() -> Config:
    return Config(
        name="charlm", task="charlm", variant="softmax", layers=4, width=256, heads=8,
        seq_len=512, batch_size=32, steps=5000, lr=1e-3, warmup=200, eval_every=500, eval_batches=16,
        log_every=50, checkpoint_every=500, keep_checkpoints=3, out_dir="runs/charlm",
        task_options={"max_bytes": 8 << 20},
    )
