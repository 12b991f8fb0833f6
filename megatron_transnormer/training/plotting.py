"""loss.png: training and validation loss per labelled token against step, with the matching
perplexity on a second axis, drawn from metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics


def plot_losses(metrics_path: Path, out_path: Path, title: str = "") -> Path | None:
    """Write the plot; None when there is nothing to draw."""
    records = read_metrics(Path(metrics_path))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and r["loss"] is not None]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib
    matplotlib.use("Agg")  # no display on compute nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / labelled token)")
    import numpy as np
    ppl = ax.secondary_yaxis("right", functions=(lambda x: np.exp(np.clip(x, None, 700)),
                                                 lambda p: np.log(np.clip(p, 1e-300, None))))
    low, high = np.exp(np.clip(ax.get_ylim(), None, 700))
    ticks = [m * 10 ** e for e in range(0, 7) for m in (1, 2, 5) if low <= m * 10 ** e <= high]
    ppl.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ppl.set_ylabel("perplexity")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
