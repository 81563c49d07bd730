"""`loraft sweep`: one LoRA classifier per (rank, alpha), and a table, CSV and plot comparing them.

Each setting trains in its own subfolder of --out. A setting with a report is done and is skipped, an
interrupted one resumes from its checkpoint: running the same command again continues a sweep.
"""

import contextlib
import csv
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from . import distributed
from .errors import LoraftError
from .files import atomic_write, read_json, write_json
from .finetune import train_classifier
from .lora import LoraConfig
from .run_folder import LOCK_FILE, changed_settings, locked
from .train import TrainConfig

COLUMNS = ("rank", "alpha", "test_accuracy", "val_accuracy", "trainable_parameters", "adapter_bytes", "wall_seconds")


def parse_grid(flag: str, text: str, kind) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise LoraftError(f"{flag} takes comma-separated numbers, e.g. 4,8,16; got {text!r}") from None
    if any(v <= 0 for v in values) or len(set(values)) < len(values):
        raise LoraftError(f"{flag} values must be positive and distinct; got {text!r}")
    return values


def check_sweep_folder(out: Path, settings: dict, overwrite: bool):
    """Continue a sweep only with the same settings, since its finished runs are reused."""
    earlier = out / "sweep.json"
    held = [p for p in out.iterdir() if p.name != LOCK_FILE]
    if held and not earlier.is_file():
        raise LoraftError(f"{out} already holds files that are not a loraft sweep; choose another --out")
    if earlier.is_file() and overwrite:
        for path in held:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    elif earlier.is_file():
        changed = changed_settings(read_json(earlier), settings)
        if changed:
            raise LoraftError(
                f"{out} holds a sweep with other settings: {changed} (was, now); start over with --overwrite"
            )


def run_sweep(
    ranks: list[int],
    alphas: list[float],
    out="runs/sweep",
    resume=False,
    overwrite=False,
    quiet=False,
    train: TrainConfig | None = None,
    lora_config: LoraConfig | None = None,
    **options,
) -> list[dict]:
    """Train every (rank, alpha) of the grid; write sweep.csv, sweep.md and sweep.png to `out`.

    `options` are train_classifier's; `resume` is implied: a sweep always continues."""
    out, train, lora_config = Path(out), train or TrainConfig(), lora_config or LoraConfig()
    grid = {(rank, alpha): replace(lora_config, rank=rank, alpha=alpha) for rank in ranks for alpha in alphas}
    lora_settings = {k: v for k, v in lora_config.as_dict().items() if k not in ("rank", "alpha")}
    settings = {
        k: list(v) if isinstance(v, tuple) else v for k, v in {**options, **lora_settings, **asdict(train)}.items()
    }
    with locked(out) if distributed.is_main() else contextlib.nullcontext():
        if distributed.is_main():
            check_sweep_folder(out, settings, overwrite)
            write_json(out / "sweep.json", settings)
        distributed.barrier()
        rows = []
        for (rank, alpha), run_lora in grid.items():  # each checked before the first run trains
            run = out / f"rank{rank}-alpha{alpha:g}"
            if (run / "report.json").is_file():
                report, note = read_json(run / "report.json"), "done earlier"
            else:
                started = (run / "checkpoint.pt").is_file()
                report = train_classifier(
                    out=run,
                    lora_config=run_lora,
                    resume=started,
                    overwrite=not started,
                    quiet=True,
                    train=train,
                    **options,
                )
                note = "resumed" if started else "trained"
            if not distributed.is_main():
                continue
            rows.append(
                {
                    "rank": rank,
                    "alpha": alpha,
                    "test_accuracy": report["test_accuracy"],
                    "val_accuracy": report["val_accuracy"],
                    "trainable_parameters": report["parameters"]["trainable"],
                    "adapter_bytes": report["adapter_bytes"],
                    "wall_seconds": round(report["wall_seconds"], 1),
                }
            )
            if not quiet:
                print(
                    f"rank {rank:>3}, alpha {alpha:>4g}: test accuracy {report['test_accuracy']:.4f}, "
                    f"{report['wall_seconds']:.0f} s ({note})",
                    flush=True,
                )
        if distributed.is_main():
            write_results(out, rows)
            if not quiet:
                print(f"results: {out / 'sweep.md'}, {out / 'sweep.csv'}, {out / 'sweep.png'}")
        return rows


def write_results(out: Path, rows: list[dict]):
    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "sweep.csv", write_csv)
    atomic_write(out / "sweep.md", lambda tmp: tmp.write_text(markdown_table(rows)))
    atomic_write(out / "sweep.png", lambda tmp: plot_sweep(rows, tmp))


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| rank | alpha | test accuracy | val accuracy | trainable parameters | adapter | wall time |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['rank']} | {r['alpha']:g} | {100 * r['test_accuracy']:.2f}% | {100 * r['val_accuracy']:.2f}% | "
            f"{r['trainable_parameters']:,} | {r['adapter_bytes'] / 1e6:.1f} MB | {r['wall_seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], path: Path):
    """Four panels over the rank, one line per alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("test_accuracy", "Test accuracy", 1),
        ("trainable_parameters", "Trainable parameters (millions)", 1e6),
        ("adapter_bytes", "Adapter size (MB)", 1e6),
        ("wall_seconds", "Wall time (s)", 1),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    for ax, (key, title, unit) in zip(axes.flat, panels):
        for alpha in dict.fromkeys(r["alpha"] for r in rows):
            points = [(r["rank"], r[key] / unit) for r in rows if r["alpha"] == alpha]
            ax.plot(*zip(*points), "o-", label=f"alpha {alpha:g}")
        ax.set_xscale("log", base=2)
        ranks = sorted({r["rank"] for r in rows})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank")
        ax.set_title(title)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
