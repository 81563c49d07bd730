"""What an int8 classifier could gain at most on this CPU: the raw rate of the matrix products at
SmolLM2-135M's block shapes, bf16 (what loraft runs) against int8 x int8 -> int32 (torch._int_mm, the
product an int8 path with quantized activations would run), for the row counts of classifying batches
(32 SMS of ~40 tokens: 1,280 rows) and of training batches (4,096), side by side in one run; then the
whole block's products weighted by their FLOPs.

    python benchmarks/int8_gemm.py

Results go to benchmarks/results/int8_gemm.json.
"""

import json
import platform
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "int8_gemm.json"
# SmolLM2-135M's block products as (in, out): q, k, v, o, gate, up, down
BLOCK = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def best_seconds(fn, repeats=20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    torch.manual_seed(0)
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": {}}
    for rows in (1280, 4096):
        shapes, block_bf16, block_int8 = {}, 0.0, 0.0
        for k, n in sorted(set(BLOCK)):
            x, w = torch.randn(rows, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
            xq = torch.randint(-127, 128, (rows, k), dtype=torch.int8)
            wq = torch.randint(-127, 128, (k, n), dtype=torch.int8)
            bf16, int8 = best_seconds(lambda x=x, w=w: x @ w.t()), best_seconds(lambda a=xq, b=wq: torch._int_mm(a, b))
            flops = 2 * rows * k * n
            shapes[f"{k}x{n}"] = {"bf16_gflops": flops / bf16 / 1e9, "int8_gops": flops / int8 / 1e9}
            block_bf16 += BLOCK.count((k, n)) * bf16
            block_int8 += BLOCK.count((k, n)) * int8
            print(
                f"{rows} rows, {k} -> {n}: bf16 {flops / bf16 / 1e9:6.0f} GFLOP/s, int8 {flops / int8 / 1e9:6.0f} GOP/s ({bf16 / int8:.2f}x)"
            )
        results["rows"][rows] = {"shapes": shapes, "block_products_int8_speedup": block_bf16 / block_int8}
        print(f"{rows} rows, a whole block's products: int8 {block_bf16 / block_int8:.2f}x bf16")
    OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
