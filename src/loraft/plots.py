"""PNG plots of a run's metrics.jsonl: loss and accuracy over epochs and examples seen (the book's figure E.5)."""

import json
from pathlib import Path


def plot_run(out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    if not rows:
        return []
    written = []
    for metric in ("loss", "accuracy"):
        if f"val_{metric}" not in rows[0]:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = [r["epoch"] for r in rows]
        for split, style in (("train", "-"), ("val", "-.")):
            points = [(e, r[f"{split}_{metric}"]) for e, r in zip(epochs, rows) if f"{split}_{metric}" in r]
            ax.plot(*zip(*points), style, label=f"{'Training' if split == 'train' else 'Validation'} {metric}")
        ax.set_xlabel("Epochs")
        ax.set_ylabel(metric.capitalize())
        ax.legend()
        seen = ax.twiny()  # a second x-axis: examples seen, as in the book
        seen.plot([r["examples_seen"] for r in rows], [r[f"val_{metric}"] for r in rows], alpha=0)
        seen.set_xlabel("Examples seen")
        fig.tight_layout()
        path = out / f"{metric}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
