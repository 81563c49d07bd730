"""Memory of loading a big Hugging Face checkpoint: a random-weight SmolLM2-1.7B-shaped checkpoint
(bf16 safetensors in two shards, as the hub has such models) loaded into bf16 by loraft and by
transformers' from_pretrained, each in a fresh process, side by side in one run.

Prints each loader's peak resident memory (once loaded, and after one forward pass, which reads every
weight) above what the process held after its imports, as a multiple of the bf16 model's size (goal
for loraft into bf16: <= 1.3x). safetensors maps the files, so a weight kept in the file's dtype is
read from the page cache only when first used; one converted to another dtype is copied at load.

    python benchmarks/load_memory.py

Results go to benchmarks/results/load_memory.json.
"""

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "load_memory.json"
SHAPE = dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=32,
    num_hidden_layers=24,
    max_position_embeddings=8192,
    rope_theta=130000.0,
    tie_word_embeddings=True,
)
SHARD_BYTES = 2 * 1024**3

# Each loads the model, then runs one forward pass, which reads every weight.
LOADERS = {
    "loraft bf16": (
        "from loraft.models import load_hf_checkpoint\n"
        "load_it = lambda f: load_hf_checkpoint(f, torch.bfloat16)\n"
        "forward = lambda model, ids: model(ids)"
    ),
    "loraft fp32": (
        "from loraft.models import load_hf_checkpoint\n"
        "load_it = lambda f: load_hf_checkpoint(f, torch.float32)\n"
        "forward = lambda model, ids: model(ids)"
    ),
    "transformers bf16": (
        "from transformers import AutoModelForCausalLM\n"
        "load_it = lambda f: AutoModelForCausalLM.from_pretrained(f, dtype=torch.bfloat16)\n"
        "forward = lambda model, ids: model(ids).logits"
    ),
}
# VmHWM, the process's own peak (getrusage's ru_maxrss would carry the parent's over the fork)
CHILD = """
import json, sys, torch
{imports}
def high_water():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024
before = high_water()
model = load_it(sys.argv[1])
loaded = high_water()
with torch.no_grad():
    forward(model, torch.tensor([[1, 2, 3]]))
peak = high_water()
print(json.dumps({{"before": before, "loaded": loaded, "peak": peak, "parameters": sum(p.numel() for p in model.parameters())}}))
"""


def write_checkpoint(folder: Path) -> int:
    """Random bf16 weights under transformers' names, in shards with their index; returns the bytes."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.AutoConfig.for_model(**SHAPE)
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in transformers.AutoModelForCausalLM.from_config(config).named_parameters()}
    shards, current, size = [], {}, 0
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        current[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        size += current[name].nbytes
        if size >= SHARD_BYTES * (len(shards) + 1):
            shards.append(current)
            current = {}
    shards.append(current)
    weight_map = {}
    for number, shard in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return size


def main():
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "shape": SHAPE}
    with tempfile.TemporaryDirectory() as tmp:
        model_bytes = write_checkpoint(Path(tmp))
        results["bf16_model_bytes"] = model_bytes
        for name, imports in LOADERS.items():
            child = subprocess.run(
                [sys.executable, "-c", CHILD.format(imports=imports), tmp], capture_output=True, text=True, check=True
            )
            measured = json.loads(child.stdout.strip().splitlines()[-1])
            for moment in ("loaded", "peak"):
                measured[f"{moment}_over_model"] = (measured[moment] - measured["before"]) / model_bytes
            results[name] = measured
            print(
                f"{name}: above the imports, {measured['loaded_over_model']:.2f}x the bf16 model once loaded, "
                f"{measured['peak_over_model']:.2f}x at the peak of load + one forward pass"
            )
    OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
