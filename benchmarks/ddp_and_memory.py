"""Scale-out and memory, measured side by side:

- ddp: one epoch of the default spam job (SmolLM2-135M, LoRA r16) in 1 process vs 2 torchrun
  processes (gloo, loopback), the same global batch of 8; wall and training time from each report.
- memory: peak resident memory of one training step of gpt2-xl (random weights, bf16 frozen base,
  LoRA r16 on all linear layers, a 2-class head, batch 8 x 120 tokens) without and with
  --gradient-checkpointing, each in a fresh process; the loss and gradient norm must not change.

    LORAFT_DATA_DIR=../shared/data python benchmarks/ddp_and_memory.py [ddp] [memory]

Results are merged into benchmarks/results/ddp_and_memory.json.
"""

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "ddp_and_memory.json"
TRAIN = ["train", "--epochs", "1", "--quiet"]


def measure_ddp() -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, launcher in [
            ("1 process, 2 threads", [sys.executable, "-m", "loraft"]),
            (
                "2 processes, 1 thread each",
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node",
                    "2",
                    "-m",
                    "loraft",
                ],
            ),
        ]:
            out = Path(tmp) / name.split(",")[0].replace(" ", "-")
            started = time.perf_counter()
            subprocess.run([*launcher, *TRAIN, "--out", str(out)], check=True)
            wall = time.perf_counter() - started
            report = json.loads((out / "report.json").read_text())
            results[name] = {
                "wall_seconds": wall,
                "train_seconds": report["train_seconds"],
                "test_accuracy": report["test_accuracy"],
                "val_accuracy": report["val_accuracy"],
            }
            print(name, json.dumps(results[name]), flush=True)
    one, two = results.values()
    results["speedup_wall"] = one["wall_seconds"] / two["wall_seconds"]
    results["speedup_train"] = one["train_seconds"] / two["train_seconds"]
    return results


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def one_step(checkpointing: bool) -> dict:
    """Runs in its own process: the peak memory of one training step, after building the model."""
    from loraft import lora
    from loraft.classifier import classify_logits
    from loraft.data.classification import Batch
    from loraft.finetune import prepare_model
    from loraft.lora import LoraConfig
    from loraft.models import gpt2

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # the frozen base in bf16 from the start, as training stores it
    model = gpt2.GPTModel(gpt2.SIZES["gpt2-xl"])
    torch.set_default_dtype(torch.float32)
    prepare_model(model, "lora", 2, LoraConfig(16, 16, "standard"))
    model.train()
    model.gradient_checkpointing = checkpointing
    batch = Batch(torch.randint(0, 50257, (8, 120)), torch.full((8,), 120), torch.tensor([0, 1] * 4))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident size
    before = peak_rss_bytes()
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(classify_logits(model, batch), batch.labels)
    loss.backward()
    seconds = time.perf_counter() - started
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return {
        "resident_before_step_bytes": before,
        "peak_bytes": peak_rss_bytes(),
        "step_seconds": seconds,
        "loss": loss.item(),
        "grad_norm": torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item(),
        "trainable_parameters": lora.parameter_summary(model)["trainable"],
    }


def measure_memory() -> dict:
    results = {}
    for name, flag in [("without checkpointing", "0"), ("with checkpointing", "1")]:
        run = subprocess.run([sys.executable, __file__, "--one-step", flag], check=True, capture_output=True, text=True)
        results[name] = json.loads(run.stdout)
        print(name, run.stdout.strip(), flush=True)
    without, with_ = results["without checkpointing"], results["with checkpointing"]
    results["peak_ratio"] = with_["peak_bytes"] / without["peak_bytes"]
    step = {k: v["peak_bytes"] - v["resident_before_step_bytes"] for k, v in results.items() if isinstance(v, dict)}
    results["step_memory_ratio"] = step["with checkpointing"] / step["without checkpointing"]
    results["step_time_ratio"] = with_["step_seconds"] / without["step_seconds"]
    return results


def main():
    if sys.argv[1:2] == ["--one-step"]:
        print(json.dumps(one_step(sys.argv[2] == "1")))
        return
    parts = sys.argv[1:] or ["ddp", "memory"]
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results["machine"] = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for part in parts:
        results[part] = {"ddp": measure_ddp, "memory": measure_memory}[part]()
        results[part]["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
