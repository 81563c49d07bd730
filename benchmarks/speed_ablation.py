"""What each of loraft's speed pieces buys: training steps of the default spam job (LoRA rank 16 on
every linear layer + a new head, bf16 autocast, batch 8, length-bucketed batches), with one piece
turned off at a time. The two variants alternate step by step over the same batches in one process:
this machine's speed drifts within an hour, so only side-by-side ratios mean anything.

    LORAFT_DATA_DIR=../shared/data python benchmarks/speed_ablation.py [smollm2-135m|gpt2-small] [STEPS]

Every piece is measured eager (turning one off under torch.compile would compile anew), against
all the others on; the last row compares compiled blocks with eager ones, compiling left out. The
rows are not additive: without LoRAProduct, q, k and v cannot share its A product either.
gpt2-small has random weights (speed does not depend on them). Writes
benchmarks/results/speed_ablation_<model>.json.
"""

import contextlib
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from loraft.classifier import ClassificationTask, TextFormat
from loraft.data.sms_spam import load_sms_spam
from loraft.finetune import prepare_model
from loraft.lora import LoraConfig, LoRALinear
from loraft.models import family_of, gpt2, kv_cache, llama, load_model
from loraft.precision import cast_frozen_weights
from loraft.tokenizer import GPT2Tokenizer
from loraft.train import compile_blocks

MODEL = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 30
WARMUP = 5
OUT = Path(__file__).parent / "results"


def each_layer_alone(x, *layers):
    return [layer(x) for layer in layers]


def repeated_keys_attention(q, k, v, training):
    group = q.shape[1] // k.shape[1]
    return kv_cache.causal_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), training)


def sdpa_math_attention(q, k, v, training, dropout_p=0.0):
    with sdpa_kernel(SDPBackend.MATH):
        return kv_cache.sdpa(q, k, v, dropout_p)


@contextlib.contextmanager
def fp32_frozen_weights(fp32_copies):
    bf16_copies = {}
    for param, copy in fp32_copies.items():
        bf16_copies[param], param.data = param.data, copy
    try:
        yield
    finally:
        for param, copy in bf16_copies.items():
            param.data = copy


def main():
    data = load_sms_spam()
    if MODEL == "gpt2-small":
        torch.manual_seed(0)
        model, tokenizer = gpt2.GPTModel(gpt2.SIZES["gpt2-small"]), GPT2Tokenizer()
    else:
        model, tokenizer = load_model(MODEL)
    torch.manual_seed(123)
    prepare_model(model, "lora", 2, LoraConfig(16, 16, "standard"))
    fp32_copies = {p: p.data.clone() for p in model.parameters() if not p.requires_grad}
    cast_frozen_weights(model, torch.bfloat16)
    model.train()
    task = ClassificationTask(tokenizer, data, TextFormat(), seed=123, autocast=True)
    batches = task.train_batches(0, 8)[: WARMUP + STEPS]
    params = [p for p in model.parameters() if p.requires_grad]
    fused, unfused = (torch.optim.AdamW(params, lr=1e-4, fused=f) for f in (True, False))
    optimizer = {"now": fused}

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = task.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer["now"].step()
        optimizer["now"].zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def unfused_adamw():
        optimizer["now"] = unfused
        try:
            yield
        finally:
            optimizer["now"] = fused

    compile_blocks(model)
    compiled_forwards = {block: vars(block)["forward"] for block in model.trf_blocks if "forward" in vars(block)}

    @contextlib.contextmanager
    def eager_blocks():
        for block in compiled_forwards:
            del block.forward
        try:
            yield
        finally:
            for block, forward in compiled_forwards.items():
                block.forward = forward

    architecture = sys.modules[family_of(model).model.__module__]  # the family's file, whose helpers are patched
    pieces = {
        "LoRAProduct (LoRA forward and backward written out)": lambda: mock.patch.object(
            LoRALinear, "fast_adapter", lambda self: None
        ),
        "one LoRA A product for q, k, v (and gate, up)": lambda: mock.patch.object(
            architecture, "shared_input_linears", each_layer_alone
        ),
        "CausalAttention (vs SDPA's math backend)": lambda: mock.patch.object(
            architecture, "causal_attention", sdpa_math_attention
        ),
        "fused AdamW": unfused_adamw,
        "bf16 frozen base weights (vs fp32 under autocast)": lambda: fp32_frozen_weights(fp32_copies),
    }
    if architecture is llama:
        pieces["grouped queries without copies of k, v"] = lambda: mock.patch.object(
            llama, "causal_attention", repeated_keys_attention
        )

    with eager_blocks():
        for batch in batches[:WARMUP]:
            step(batch)
    for batch in batches[:WARMUP]:  # compiles
        step(batch)

    def side_by_side(turned_off) -> dict:
        seconds = {"with": 0.0, "without": 0.0}
        with turned_off():  # its first step may allocate (AdamW's state, say)
            step(batches[0])
        for i, batch in enumerate(batches[WARMUP:]):
            for variant in ("with", "without") if i % 2 else ("without", "with"):
                with turned_off() if variant == "without" else contextlib.nullcontext():
                    started = time.perf_counter()
                    step(batch)
                    seconds[variant] += time.perf_counter() - started
        steps = len(batches) - WARMUP
        return {
            "ms_per_step_with": 1000 * seconds["with"] / steps,
            "ms_per_step_without": 1000 * seconds["without"] / steps,
            "speedup": seconds["without"] / seconds["with"],
        }

    rows = {}
    with eager_blocks():
        for name, turned_off in pieces.items():
            rows[name] = side_by_side(turned_off)
    rows["torch.compile of the blocks (steady state, compiling left out)"] = side_by_side(eager_blocks)
    timed = batches[WARMUP:]
    tokens = sum(int(b.lengths.sum()) for b in timed)
    result = {
        "benchmark": f"training steps, {MODEL}, SMS spam, batch 8, LoRA r16 all linear + head, bf16 autocast; {len(timed)} batches of {tokens / len(timed):.0f} real tokens on average, each variant run on every batch",
        "threads": torch.get_num_threads(),
        "pieces": rows,
    }
    print(result["benchmark"])
    print(f"{'piece':66} {'ms/step with':>12} {'without':>8} {'speedup':>8}")
    for name, row in rows.items():
        print(f"{name:66} {row['ms_per_step_with']:12.0f} {row['ms_per_step_without']:8.0f} {row['speedup']:7.2f}x")
    OUT.mkdir(exist_ok=True)
    (OUT / f"speed_ablation_{MODEL}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
