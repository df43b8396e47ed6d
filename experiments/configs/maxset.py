"""Maximum of a set (zoo part 4): sets of 16 digits, predict the largest; the Set Transformer's
permutation-equivariant blocks as the attention layer.

    python -m experiments.train --config maxset --override variant=isab

``variant=isab`` (8 inducing points, ``variant_options={"inducing": 8}``; the default here adds
``"pool": "pma"``: the model pools by PMA with one seed instead of the mean), ``sab`` or any
bidirectional variant for comparison (other variants pool by the mean: pass
``variant_options={}``). 2 layers, width 32, 300 steps of batch 32; about a minute
on a 2-core CPU. The metric is validation accuracy over 10 classes (chance 10%).
"""

from ..config import Config


def config() -> Config:
    return Config(
        name="maxset", task="maxset", variant="isab", variant_options={"pool": "pma"}, layers=2, width=32, heads=4,
        batch_size=32, steps=300, lr=3e-3, warmup=30, eval_every=100, log_every=20, checkpoint_every=0,
        out_dir="runs/maxset",
    )
