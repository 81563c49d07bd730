"""QLoRA's memory and speed: LoRA training steps over the same base kept whole (none: bf16 where the CPU
runs bf16 natively, else fp32, as `loraft train` keeps it), in int8, in nf4 and (for a GGUF) in the
file's own blocks, each in a fresh process, side by side in one run.

Models: SmolLM2-135M from its Q4_1 GGUF (the default model), and with `1.7b`, a random-weight
SmolLM2-1.7B-shaped checkpoint (bf16 safetensors, written as benchmarks/load_memory.py writes it).
Each step: batch 8 x 128 tokens of SMS messages, LoRA rank 16 on every block linear layer plus a
2-class head, gradient checkpointing, AdamW.

Prints, per mode: bytes per frozen block weight (goal: <= 0.6 for nf4 and a 4-bit GGUF, <= 1.1 for
int8), the peak resident memory during the training steps (VmHWM reset after loading; goal for 1.7B
nf4: <= 3 GB) and the step time as a multiple of the whole base's (goal: <= 1.5x).

    LORAFT_DATA_DIR=../shared/data python benchmarks/qlora_memory.py [1.7b] [--eager]

Where a C++ compiler is found, each mode runs as `loraft train` runs it: the whole base's blocks
compiled, a quantized base's dequantization compiled into one kernel per format (--eager: neither).

Results go to benchmarks/results/qlora_memory.json (--eager: qlora_memory_eager.json).
"""

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from loraft.data.sms_spam import load_sms_spam
from loraft.train import compiler_found

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from load_memory import write_checkpoint  # noqa: E402

from tests.models.checkpoints import write_tokenizer  # noqa: E402  (a byte-level BPE for the SMS batches)

OUT = Path(__file__).parent / "results" / "qlora_memory.json"
STEPS, WARMUP = 3, 2  # warm-up steps: compiling happens in them
COMPILED = "--eager" not in sys.argv and compiler_found()  # as `loraft train` runs on a CPU with a C++ compiler

CHILD = """
import json, sys, time, torch
from loraft import lora
from loraft.data.sms_spam import load_sms_spam
from loraft.finetune import prepare_model
from loraft.models import load_model
from loraft.precision import bf16_autocast, bf16_supported
from loraft.quantize import QuantizedLinear
from loraft.train import compile_blocks

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

model_name, mode, steps, warmup, compiled = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
bf16 = bf16_supported()
model, tokenizer = load_model(model_name, dtype=torch.bfloat16 if bf16 else torch.float32, quantize=mode)
block_weights = [m for n, m in model.named_modules() if n.startswith("trf_blocks.") and isinstance(m, (torch.nn.Linear, QuantizedLinear))]
frozen_bytes = sum(m.weight.nbytes() if isinstance(m, QuantizedLinear) else m.weight.nbytes for m in block_weights)
frozen_count = sum(m.weight.shape.numel() for m in block_weights)
torch.manual_seed(0)
prepare_model(model, "lora", 2, lora.LoraConfig(rank=16, alpha=16))
model.gradient_checkpointing = True
model.train()
if compiled:  # as `loraft train` compiles: the whole base's blocks, or a quantized base's dequantization
    compile_blocks(model)
texts = load_sms_spam().train.texts
ids = [t for text in texts for t in tokenizer.encode(text)]
batches = [torch.tensor(ids[i * 1024 : (i + 1) * 1024]).view(8, 128) for i in range(steps + warmup)]
labels = torch.tensor([0, 1] * 4)
optimizer = torch.optim.AdamW(lora.adapter_parameters(model), lr=1e-3)
times = []
for step, batch in enumerate(batches):
    if step == warmup:  # VmHWM from here on: the training steps' own peak, compiling left out
        open("/proc/self/clear_refs", "w").write("5")
    started = time.perf_counter()
    with bf16_autocast(torch.device("cpu"), bf16):
        logits = model(batch)[:, -1, :].float()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    optimizer.step()
    optimizer.zero_grad()
    times.append(time.perf_counter() - started)
print(json.dumps({"bytes_per_frozen_weight": frozen_bytes / frozen_count, "frozen_block_weights": frozen_count,
                  "step_peak_bytes": status("VmHWM"), "seconds_per_step": sum(times[warmup:]) / steps, "bf16": bf16}))
"""


def run(model: str, mode: str) -> dict:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, model, mode, str(STEPS), str(WARMUP), str(int(COMPILED))],
        capture_output=True,
        text=True,
    )
    if child.returncode:
        raise SystemExit(f"{model} --quantize {mode} failed:\n{child.stderr}")
    return json.loads(child.stdout.splitlines()[-1])


def compare(model: str, modes: list[str], label: str | None = None) -> dict:
    rows = {mode: run(model, mode) for mode in modes}
    whole = rows["none"]
    for mode, row in rows.items():
        row["step_time_vs_whole"] = row["seconds_per_step"] / whole["seconds_per_step"]
        row["peak_vs_whole"] = row["step_peak_bytes"] / whole["step_peak_bytes"]
        print(
            f"{label or model:>19} {mode:>5}: {row['bytes_per_frozen_weight']:.3f} bytes per frozen weight, step peak "
            f"{row['step_peak_bytes'] / 1e9:.2f} GB ({row['peak_vs_whole']:.2f}x), "
            f"{row['seconds_per_step']:.2f} s per step ({row['step_time_vs_whole']:.2f}x)"
        )
    return rows


def main():
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    results["compiled"] = COMPILED
    results["smollm2-135m"] = compare("smollm2-135m", ["none", "int8", "nf4", "gguf"])
    if "1.7b" in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as folder:
            write_checkpoint(Path(folder))
            write_tokenizer(Path(folder), load_sms_spam().train.texts, pre="smollm", vocab_size=8192)
            results["smollm2-1.7b-shaped"] = compare(folder, ["none", "int8", "nf4"], "smollm2-1.7b-shaped")
    out = OUT if COMPILED else OUT.with_name("qlora_memory_eager.json")
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
