"""How fast each quantized format becomes a bf16 weight, the work a quantized base adds to every layer's
forward and backward: one 8192 x 2048 weight (SmolLM2-1.7B's MLP), dequantized eagerly op by op, by
loraft's compiled kernel (`quantize.fuse_dequantizing`, what --compile does over a --quantize base) and,
for nf4, by bitsandbytes' kernel (used where it is installed), beside the bf16 product of the same
weight with 1,024 tokens (a training step's batch 8 x 128), side by side in one run.

    python benchmarks/dequantize_speed.py

Results go to benchmarks/results/dequantize_speed.json.
"""

import json
import platform
import sys
from pathlib import Path

import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from loraft import quantize as quantized
from loraft.quantize import GGUFWeight, Int8Weight, NF4Weight, fuse_dequantizing

sys.path.insert(0, str(Path(__file__).parent))
from int8_gemm import best_seconds  # noqa: E402

OUT = Path(__file__).parent / "results" / "dequantize_speed.json"


def best_ms(fn) -> float:
    return 1e3 * best_seconds(fn, repeats=10)


def main():
    torch.manual_seed(0)
    w = torch.randn(8192, 2048)
    x, dense = torch.randn(1024, 2048, dtype=torch.bfloat16), w.bfloat16()
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    results["bf16 product, 1024 tokens (ms)"] = best_ms(lambda: x @ dense.t())
    print(f"bf16 product of the weight with 1,024 tokens: {results['bf16 product, 1024 tokens (ms)']:.1f} ms")
    q4_1 = torch.from_numpy(quantize(w.numpy(), GGMLQuantizationType.Q4_1))
    weights = {"int8": Int8Weight(w), "nf4": NF4Weight(w), "gguf Q4_1": GGUFWeight(q4_1, "Q4_1", w.shape)}
    quantized.BITSANDBYTES_DEVICES = ()  # loraft's own kernels first; bitsandbytes' below
    for name, weight in weights.items():
        row = {"eager (ms)": best_ms(lambda w=weight: w.dequantize(torch.bfloat16))}
        fuse_dequantizing(weight)
        row["compiled (ms)"] = best_ms(lambda w=weight: w.dequantize(torch.bfloat16))
        if name == "nf4" and quantized.bitsandbytes_found():
            row["bitsandbytes (ms)"] = best_ms(lambda w=weight: w.bitsandbytes_dequantize(torch.bfloat16))
        results[name] = row
        print(f"{name:>10}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
    OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
