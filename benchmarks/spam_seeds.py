"""The default spam job's test accuracy over several seeds, for settings compared side by side in one
run: each setting is `loraft train` with extra flags, run once per seed, each run in its own process
and folder, one after another (nothing else should run meanwhile: wall times are compared too).

    LORAFT_DATA_DIR=../shared/data python benchmarks/spam_seeds.py qlora      # bf16 base, nf4, gguf
    LORAFT_DATA_DIR=../shared/data python benchmarks/spam_seeds.py NAME="--flag value" ...   # your own

Prints every run, then per setting the mean test accuracy, its difference to the first setting's
mean, and the mean wall time relative to the first setting's. Results go to
benchmarks/results/spam_seeds_<group>.json.
"""

import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEEDS = (123, 124, 125)
GROUPS = {
    "qlora": {"bf16 base": "", "nf4": "--quantize nf4", "gguf (Q4_1)": "--quantize gguf"},
}


def train(flags: str, seed: int, folder: Path) -> dict:
    started = time.perf_counter()
    command = ["loraft", "train", "--out", str(folder), "--seed", str(seed), "--quiet", *shlex.split(flags)]
    subprocess.run(command, check=True)
    report = json.loads((folder / "report.json").read_text())
    adapter = folder / "adapter" / "adapter.safetensors"
    return {
        "seed": seed,
        "test_accuracy": report["test_accuracy"],
        "val_accuracy": report["val_accuracy"],
        "wall_seconds": time.perf_counter() - started,
        "adapter_bytes": adapter.stat().st_size,
    }


def main():
    if len(sys.argv) == 2 and sys.argv[1] in GROUPS:
        group, settings = sys.argv[1], GROUPS[sys.argv[1]]
    else:
        group, settings = "custom", dict(arg.split("=", 1) for arg in sys.argv[1:])
    results = {"machine": platform.processor() or platform.machine(), "seeds": SEEDS, "settings": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, flags in settings.items():
            runs = []
            for seed in SEEDS:
                runs.append(train(flags, seed, Path(scratch) / f"{len(results['settings'])}-{seed}"))
                print(f"{name:>14} seed {seed}: test {runs[-1]['test_accuracy']:.4f}, {runs[-1]['wall_seconds']:.0f} s")
            results["settings"][name] = {"flags": flags, "runs": runs}
    first = None
    for name, setting in results["settings"].items():
        runs = setting["runs"]
        setting["mean_test_accuracy"] = statistics.mean(r["test_accuracy"] for r in runs)
        setting["mean_wall_seconds"] = statistics.mean(r["wall_seconds"] for r in runs)
        accuracies = ", ".join(f"{100 * r['test_accuracy']:.2f}" for r in runs)
        first = first or setting
        setting["points_vs_first"] = 100 * (setting["mean_test_accuracy"] - first["mean_test_accuracy"])
        setting["wall_vs_first"] = setting["mean_wall_seconds"] / first["mean_wall_seconds"]
        print(
            f"{name:>14}: mean test accuracy {100 * setting['mean_test_accuracy']:.2f}% "
            f"({setting['points_vs_first']:+.2f} points), wall time {setting['wall_vs_first']:.2f}x, "
            f"runs {accuracies}"
        )
    out = Path(__file__).parent / "results" / f"spam_seeds_{group}.json"
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
