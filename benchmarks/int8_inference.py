"""A candidate the issue on inference speed asked for, measured before shipping it: the merged spam
classifier's block linear layers in int8 on oneDNN's int8 kernel (VNNI on x86), int8 weights per
output row, each input row quantized on the fly; against the shipped bf16 paths, side by side in one
run on the 300 test messages: SMS/s, and labels and probabilities against fp32.

    LORAFT_DATA_DIR=../shared/data python benchmarks/int8_inference.py runs/sms-spam/adapter

Inductor cannot compile oneDNN's int8 product with weights that are module state (its own lowering
wants them constant), so the compiled variant breaks its graph around each product.
"""

import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from loraft import lora
from loraft.classifier import TextFormat, predict_proba
from loraft.data.sms_spam import load_sms_spam
from loraft.inference import compile_for_inference
from loraft.job import load_trained

INPUT_SCALE, INPUT_ZERO = torch.tensor(1 / 127), torch.tensor(128)


class Int8Linear(nn.Module):
    """x W^T with W int8 (absmax per output row) and each row of x to uint8 around 128 by its own absmax;
    oneDNN takes one input scale, so the rows' scales come off the output (exact: linear in each row)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        self.scale = weight.abs().amax(dim=1).clamp(min=1e-30) / 127
        self.packed = torch.ops.onednn.qlinear_prepack(torch.round(weight / self.scale[:, None]).to(torch.int8), None)
        self.zero_points = torch.zeros(len(self.scale), dtype=torch.long)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.out_features, self.in_features = weight.shape

    def forward(self, x):
        rows = x.reshape(-1, self.in_features).float()
        row_max = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
        out = int8_product(torch.round(rows / row_max * 127 + 128).to(torch.uint8), self)
        out = out * row_max if self.bias is None else torch.addcmul(self.bias, out, row_max)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


@torch.compiler.disable
def int8_product(codes, layer):
    return torch.ops.onednn.qlinear_pointwise.tensor(
        codes, INPUT_SCALE, INPUT_ZERO, layer.packed, layer.scale, layer.zero_points, None, 1.0, 0,
        torch.float32, "none", [], "",
    )  # fmt: skip


def int8_model(model):
    """A copy with every block linear layer in int8; a merged LoRA layer is replaced whole by its base."""
    int8 = copy.deepcopy(model)
    for name, module in list(int8.named_modules()):
        if not name.startswith("trf_blocks.") or name.endswith(".base"):
            continue
        if isinstance(module, lora.LoRALinear):
            lora.replace_module(int8, name, Int8Linear(module.base))
        elif type(module) is nn.Linear:
            lora.replace_module(int8, name, Int8Linear(module))
    return int8


def main():
    adapter = Path(sys.argv[1])
    texts = load_sms_spam().test.texts
    reference, tokenizer, meta = load_trained(adapter, "classification", bf16=False)
    fmt = TextFormat.of_adapter(meta)
    expected = predict_proba(reference, tokenizer, texts, fmt)
    bf16, _, _ = load_trained(adapter, "classification", bf16=True)
    compiled = copy.deepcopy(bf16)
    compile_for_inference(compiled, len(texts), asked=True)
    int8_compiled = int8_model(bf16)
    compile_for_inference(int8_compiled, len(texts), asked=True)
    models = {
        "bf16 eager": bf16,
        "bf16 compiled": compiled,
        "int8 eager": int8_model(bf16),
        "int8 compiled": int8_compiled,
    }
    results = {}
    for name, model in models.items():
        probs = predict_proba(model, tokenizer, texts, fmt, autocast=True)  # warm-up (and compiling)
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            predict_proba(model, tokenizer, texts, fmt, autocast=True)
            seconds.append(time.perf_counter() - start)
        results[name] = {
            "sms_per_second": len(texts) / min(seconds),
            "labels_unlike_fp32": int((probs.argmax(-1) != expected.argmax(-1)).sum()),
            "max_probability_gap": float((probs - expected).abs().max()),
        }
    for name, r in results.items():
        ratio = r["sms_per_second"] / results["bf16 compiled"]["sms_per_second"]
        print(
            f"{name:14} {r['sms_per_second']:6.1f} SMS/s ({ratio:.2f}x bf16 compiled), "
            f"{r['labels_unlike_fp32']} labels unlike fp32, largest probability gap {r['max_probability_gap']:.3f}"
        )
    out = Path(__file__).parent / "results" / "int8_inference.json"
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
