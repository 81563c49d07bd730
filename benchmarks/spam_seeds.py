"""Test scores over several seeds, for settings compared side by side in one run: each setting is
`loraft train` (the default spam job) or `loraft instruct` (the book's instruction job) with extra
flags, run once per seed, each run in its own process and folder, one after another (nothing else
should run meanwhile: training times are compared too).

    LORAFT_DATA_DIR=../shared/data python benchmarks/spam_seeds.py qlora      # bf16 base, nf4, gguf
    LORAFT_DATA_DIR=../shared/data python benchmarks/spam_seeds.py variants   # lora, dora, adalora, lora+, pissa
    LORAFT_DATA_DIR=../shared/data python benchmarks/spam_seeds.py instruct-variants   # the same, instruct, 1 seed
    LORAFT_DATA_DIR=../shared/data python benchmarks/spam_seeds.py NAME="--flag value" ...   # your own, spam job
    ... spam_seeds.py variants --seeds 1   # a group's first seed only

Prints every run, then per setting the mean test score (spam: accuracy; instruct: ROUGE-L of the
greedy test answers), its difference to the first setting's mean, the mean training time (the loop's
own, evaluations left out) and wall time relative to the first setting's, and the adapter's size.
Results go to benchmarks/results/spam_seeds_<group>.json.
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
VARIANTS = {
    "lora": "",
    "dora": "--variant dora",
    "adalora": "--variant adalora",
    "lora+ (ratio 16)": "--lora-plus-ratio 16",
    "pissa": "--init pissa",
}
GROUPS = {  # (loraft command, seeds, settings)
    "qlora": ("train", SEEDS, {"bf16 base": "", "nf4": "--quantize nf4", "gguf (Q4_1)": "--quantize gguf"}),
    "variants": ("train", SEEDS, VARIANTS),
    "instruct-variants": ("instruct", SEEDS[:1], VARIANTS),
}
SCORES = {  # the test score of each command's report.json
    "train": ("test accuracy", lambda report: report["test_accuracy"]),
    "instruct": ("test ROUGE-L", lambda report: report["answers_after"]["rouge_l"]),
}


def train(command: str, flags: str, seed: int, folder: Path) -> dict:
    started = time.perf_counter()
    run = ["loraft", command, "--out", str(folder), "--seed", str(seed), "--quiet", *shlex.split(flags)]
    subprocess.run(run, check=True)
    report = json.loads((folder / "report.json").read_text())
    adapter = folder / "adapter" / "adapter.safetensors"
    return {
        "seed": seed,
        "test_score": SCORES[command][1](report),
        "train_seconds": report["train_seconds"],
        "wall_seconds": time.perf_counter() - started,
        "adapter_bytes": adapter.stat().st_size,
    }


def main():
    arguments = sys.argv[1:]
    count = None
    if arguments[-2:-1] == ["--seeds"]:  # only the first N seeds of the group
        count, arguments = int(arguments[-1]), arguments[:-2]
    if len(arguments) == 1 and arguments[0] in GROUPS:
        group, (command, seeds, settings) = arguments[0], GROUPS[arguments[0]]
        seeds = seeds[:count]
    else:
        group, command, seeds = "custom", "train", SEEDS
        settings = dict(arg.split("=", 1) for arg in arguments)
    score = SCORES[command][0]
    results = {"machine": platform.processor() or platform.machine(), "command": command, "score": score}
    results |= {"seeds": seeds, "settings": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, flags in settings.items():
            runs = []
            for seed in seeds:
                runs.append(train(command, flags, seed, Path(scratch) / f"{len(results['settings'])}-{seed}"))
                print(f"{name:>18} seed {seed}: {score} {runs[-1]['test_score']:.4f}, {runs[-1]['wall_seconds']:.0f} s")
            results["settings"][name] = {"flags": flags, "runs": runs}
    first = None
    for name, setting in results["settings"].items():
        runs = setting["runs"]
        for key in ("test_score", "train_seconds", "wall_seconds", "adapter_bytes"):
            setting[f"mean_{key}"] = statistics.mean(r[key] for r in runs)
        first = first or setting
        setting["points_vs_first"] = 100 * (setting["mean_test_score"] - first["mean_test_score"])
        setting["train_time_vs_first"] = setting["mean_train_seconds"] / first["mean_train_seconds"]
        setting["wall_vs_first"] = setting["mean_wall_seconds"] / first["mean_wall_seconds"]
        scores = ", ".join(f"{100 * r['test_score']:.2f}" for r in runs)
        print(
            f"{name:>18}: mean {score} {100 * setting['mean_test_score']:.2f} ({setting['points_vs_first']:+.2f} "
            f"points), training time {setting['train_time_vs_first']:.2f}x, wall {setting['wall_vs_first']:.2f}x, "
            f"adapter {setting['mean_adapter_bytes'] / 1e6:.1f} MB; runs {scores}"
        )
    out = Path(__file__).parent / "results" / f"spam_seeds_{group}.json"
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
