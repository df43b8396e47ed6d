"""Draws the figures of docs/analysis.md with `attnjax.analysis.views`, the calls of
colabs/06_analysis.ipynb, on two tiny models of `experiments`: the char-LM (2 layers, 4 heads,
width 64) trained 150 steps on 64-byte windows, and the digits classifier (8x8 pixel tokens)
trained 150 steps for the rollout over an image grid. Under a minute on a 2-core CPU:

    python docs/make_analysis_figures.py      # from the repository root; writes docs/images/analysis/*.png
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `attnjax` and `experiments` from this checkout
from attnjax import analysis  # noqa: E402
from attnjax.analysis import views  # noqa: E402
from experiments import tasks  # noqa: E402
from experiments.configs import digits, tiny_charlm  # noqa: E402
from experiments.model import Model, loss_and_metrics  # noqa: E402

OUT = ROOT / "docs" / "images" / "analysis"


def train(cfg):
    """The model of ``cfg`` after ``cfg.steps`` Adam steps, its task and its loss function."""
    task = tasks.get(cfg.task, cfg)
    model = Model(cfg, task, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(cfg.lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        (loss, _), grads = nnx.value_and_grad(loss_and_metrics, has_aux=True)(model, batch, 0.0)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, task.train_batch(cfg, s))) for s in range(cfg.steps)]
    print(f"{cfg.name}: train loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    return model, task, lambda m, b: loss_and_metrics(m, b, 0.0)[0]


def save(fig, name):
    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=80, bbox_inches="tight")
    matplotlib.pyplot.close(fig)
    print(f"{path.relative_to(ROOT)}: {path.stat().st_size // 1024} KiB")


def main():
    OUT.mkdir(parents=True, exist_ok=True)

    # The char-LM: heatmap, detectors, importance and pruning, rollout matrix, q/k embedding.
    cfg = dataclasses.replace(tiny_charlm.config(), steps=150, seq_len=64, task_options={"max_bytes": 1 << 18})
    model, task, loss_fn = train(cfg)
    x = task.valid_batches(cfg)[0]["inputs"][:4]
    with analysis.capture(model) as cap:
        nnx.jit(lambda m, x: m(x))(model, x)
    layers, maps = list(cap.weights), cap.stacked()  # one [B, H, T, T] array per layer
    text = bytes(np.asarray(x[0], np.uint8)).decode("latin-1")
    causal = np.tril(np.ones((24, 24), bool))
    save(views.heatmap(maps[0][:, :, :24, :24], mask=causal, labels=list(text[:24])), "heatmap")

    stats = {n: analysis.weight_stats(w) for n, w in zip(layers, maps)}
    prev = {n: analysis.previous_token_score(s) for n, s in stats.items()}
    sink = {n: analysis.sinks(s, causal=True).score.max(-1) for n, s in stats.items()}
    save(views.head_bars(prev, title="previous-token score", ylabel="mean A[t, t-1]"), "previous_token")
    save(views.head_bars(sink, title="strongest sink per head", ylabel="x uniform"), "sinks")

    batches = task.valid_batches(cfg)[:2]
    imp = analysis.head_importance(model, loss_fn, batches)
    eval_loss = nnx.jit(lambda m: sum(loss_fn(m, b) for b in batches) / len(batches))
    save(views.head_bars(imp, title="head importance (Michel et al.)"), "head_importance")
    save(views.pruning_plot(analysis.pruning_curve(model, eval_loss, imp), ylabel="valid loss (nats/byte)"), "pruning")

    r = analysis.rollout(maps)
    save(views.heatmap(r[0, :32, :32], titles=["rollout, both layers"], cols=1), "rollout_charlm")
    h = model.blocks[0].attn_in_norm(model.embed(x[:1]) + model.position[...][: x.shape[1]])
    q, k, _ = model.blocks[0].attention.project(h)
    head = int(np.argmax(prev[layers[0]]))  # the most previous-token-like head of layer 0
    save(views.qk_embedding(q, k, head=head), "qk_embedding")

    # The digits classifier: rollout over its 8x8 grid of pixel tokens, drawn over the image.
    cfg = dataclasses.replace(digits.config(), steps=150)
    model, task, _ = train(cfg)
    image = task.valid_batches(cfg)[0]["inputs"][:1]  # [1, 64, 1]
    with analysis.capture(model) as cap:
        model(image)
    r = analysis.rollout(cap.stacked())
    save(views.rollout_image(r, (8, 8), image=image[0, :, 0].reshape(8, 8)), "rollout_image")


if __name__ == "__main__":
    main()
